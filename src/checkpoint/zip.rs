//! The little of the zip format `torch.save` archives need: the central directory (with zip64,
//! since a 33 GB shard exceeds the 32-bit fields) and stored (uncompressed) entries, which we
//! hand out as byte ranges of the memory map.

use std::collections::HashMap;
use std::ops::Range;

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

/// Entry name -> byte range of its (stored) data in the archive.
#[derive(Debug, Default)]
pub struct ZipIndex {
    pub entries: HashMap<String, Range<usize>>,
    /// Names in central-directory order.
    pub names: Vec<String>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as u64)
}
fn u32_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as u64)
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn to_usize(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit in memory"))
}

/// Parse the central directory of the zip archive `b`.
pub fn read_index(b: &[u8]) -> Result<ZipIndex, String> {
    let trunc = |what: &str| format!("truncated zip archive: {what} runs past the end");
    // The end record is 22 bytes plus a comment of up to 65535 bytes, so search that window.
    let lo = b.len().saturating_sub(22 + 65535);
    let eocd = (lo..b.len().saturating_sub(21))
        .rev()
        .find(|&i| u32_at(b, i) == Some(EOCD_SIG as u64))
        .ok_or("not a zip archive: no end-of-central-directory record")?;
    let mut count = u16_at(b, eocd + 10).unwrap();
    let mut cd_size = u32_at(b, eocd + 12).unwrap();
    let mut cd_off = u32_at(b, eocd + 16).unwrap();
    if eocd >= 20 && u32_at(b, eocd - 20) == Some(EOCD64_LOCATOR_SIG as u64) {
        let at = to_usize(u64_at(b, eocd - 12).unwrap(), "zip64 record offset")?;
        if u32_at(b, at) != Some(EOCD64_SIG as u64) {
            return Err("zip64 locator points at no zip64 end record".into());
        }
        count = u64_at(b, at + 32).ok_or_else(|| trunc("zip64 end record"))?;
        cd_size = u64_at(b, at + 40).ok_or_else(|| trunc("zip64 end record"))?;
        cd_off = u64_at(b, at + 48).ok_or_else(|| trunc("zip64 end record"))?;
    }
    let cd_off = to_usize(cd_off, "central directory offset")?;
    let cd_end = cd_off
        .checked_add(to_usize(cd_size, "central directory size")?)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| trunc("central directory"))?;
    // Each header is at least 46 bytes, which bounds the count by the file size.
    if count > ((cd_end - cd_off) / 46) as u64 {
        return Err(format!("zip claims {count} entries in a {} byte directory", cd_end - cd_off));
    }
    let mut idx = ZipIndex::default();
    let mut p = cd_off;
    for _ in 0..count {
        if p + 46 > cd_end || u32_at(b, p) != Some(CENTRAL_SIG as u64) {
            return Err(format!("corrupt zip central directory at byte {p}"));
        }
        let method = u16_at(b, p + 10).unwrap();
        let mut csize = u32_at(b, p + 20).unwrap();
        let mut usize_ = u32_at(b, p + 24).unwrap();
        let name_len = u16_at(b, p + 28).unwrap() as usize;
        let extra_len = u16_at(b, p + 30).unwrap() as usize;
        let comment_len = u16_at(b, p + 32).unwrap() as usize;
        let mut local = u32_at(b, p + 42).unwrap();
        let name_end = p + 46 + name_len;
        let extra_end = name_end + extra_len;
        if extra_end + comment_len > cd_end {
            return Err(trunc("central directory entry"));
        }
        let name = std::str::from_utf8(&b[p + 46..name_end])
            .map_err(|_| format!("zip entry name at byte {p} is not UTF-8"))?
            .to_string();
        // Zip64 extra field: the 64-bit values present are those whose 32-bit field is saturated.
        let mut e = name_end;
        while e + 4 <= extra_end {
            let id = u16_at(b, e).unwrap();
            let len = u16_at(b, e + 2).unwrap() as usize;
            let body = e + 4;
            if body + len > extra_end {
                return Err(format!("zip entry `{name}`: extra field runs past its header"));
            }
            if id == 1 {
                let mut q = body;
                let mut next = |v: &mut u64| -> Result<(), String> {
                    if *v == 0xFFFF_FFFF {
                        if q + 8 > body + len {
                            return Err(format!("zip entry `{name}`: short zip64 field"));
                        }
                        *v = u64_at(b, q).unwrap();
                        q += 8;
                    }
                    Ok(())
                };
                next(&mut usize_)?;
                next(&mut csize)?;
                next(&mut local)?;
            }
            e = body + len;
        }
        if method != 0 {
            return Err(format!(
                "zip entry `{name}` is compressed (method {method}); torch.save stores entries uncompressed"
            ));
        }
        if csize != usize_ {
            return Err(format!(
                "zip entry `{name}`: stored size {csize} differs from size {usize_}"
            ));
        }
        let local = to_usize(local, "local header offset")?;
        if local.checked_add(30).map_or(true, |x| x > b.len())
            || u32_at(b, local) != Some(LOCAL_SIG as u64)
        {
            return Err(format!("zip entry `{name}`: no local header at byte {local}"));
        }
        let lname = u16_at(b, local + 26).unwrap() as usize;
        let lextra = u16_at(b, local + 28).unwrap() as usize;
        let start = local + 30 + lname + lextra;
        let end = start
            .checked_add(to_usize(csize, "entry size")?)
            .filter(|&x| x <= b.len())
            .ok_or_else(|| format!("truncated zip archive: entry `{name}` runs past the end"))?;
        if idx.entries.insert(name.clone(), start..end).is_some() {
            return Err(format!("zip entry `{name}` appears twice"));
        }
        idx.names.push(name);
        p = extra_end + comment_len;
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored entry as zip writers lay it out, with every size field saturated and the real
    /// values in zip64 extra fields, and a zip64 end record.
    fn zip64(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let off = out.len() as u64;
            out.extend(LOCAL_SIG.to_le_bytes());
            out.extend([45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend([0xff; 8]);
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(20u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(1u16.to_le_bytes());
            out.extend(16u16.to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            out.extend(*data);
            central.extend(CENTRAL_SIG.to_le_bytes());
            central.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend([0xff; 8]);
            central.extend((name.len() as u16).to_le_bytes());
            central.extend(28u16.to_le_bytes());
            central.extend([0; 10]);
            central.extend([0xff; 4]);
            central.extend(name.as_bytes());
            central.extend(1u16.to_le_bytes());
            central.extend(24u16.to_le_bytes());
            central.extend((data.len() as u64).to_le_bytes());
            central.extend((data.len() as u64).to_le_bytes());
            central.extend(off.to_le_bytes());
        }
        let cd_off = out.len() as u64;
        out.extend(&central);
        let eocd64 = out.len() as u64;
        out.extend(EOCD64_SIG.to_le_bytes());
        out.extend(44u64.to_le_bytes());
        out.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend((entries.len() as u64).to_le_bytes());
        out.extend((entries.len() as u64).to_le_bytes());
        out.extend((central.len() as u64).to_le_bytes());
        out.extend(cd_off.to_le_bytes());
        out.extend(EOCD64_LOCATOR_SIG.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(eocd64.to_le_bytes());
        out.extend(1u32.to_le_bytes());
        out.extend(EOCD_SIG.to_le_bytes());
        out.extend([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        out.extend([0xff; 8]);
        out.extend([0, 0]);
        out
    }

    #[test]
    fn reads_zip64_directories() {
        let z = zip64(&[("a/data.pkl", b"hello"), ("a/data/0", &[1, 2, 3, 4])]);
        let idx = read_index(&z).unwrap();
        assert_eq!(idx.names, ["a/data.pkl", "a/data/0"]);
        assert_eq!(&z[idx.entries["a/data.pkl"].clone()], b"hello");
        assert_eq!(&z[idx.entries["a/data/0"].clone()], &[1, 2, 3, 4]);
        // Every truncation is refused without a panic.
        for n in 0..z.len() {
            let _ = read_index(&z[..n]);
        }
    }
}
