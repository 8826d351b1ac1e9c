//! The `.npy` array format (version 1.0-3.0), as far as logits need it: little-endian `f8` / `f4`
//! arrays in C order are read (as f64), and `[T, V]` f32 arrays are written. Golden logits from the
//! reference implementation arrive this way, and ours leave this way for comparison.

use crate::error::{Error, IoContext, Result};
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// An array read from a `.npy` file, widened to f64.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl NpyArray {
    /// Row `r` of a 2-D array.
    pub fn row(&self, r: usize) -> &[f64] {
        let cols = *self.shape.last().unwrap_or(&1);
        &self.data[r * cols..(r + 1) * cols]
    }
}

#[derive(Clone, Copy)]
enum Elem {
    F64,
    F32,
}

/// Read an `f8` or `f4` little-endian, C-order array.
pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).at(path)?;
    parse(&bytes).map_err(|msg| Error::bad_file(path, msg))
}

/// Parse the bytes of a `.npy` file; the error says what was malformed.
pub fn parse(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (missing the \\x93NUMPY magic)".into());
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        return Err(format!("truncated .npy header: needs {data_start} bytes, file has {}", bytes.len()));
    }
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| "the .npy header is not text".to_string())?;
    let descr = dict_value(header, "descr")?;
    let elem = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f8" => Elem::F64,
        "<f4" => Elem::F32,
        other => return Err(format!("dtype {other}: only little-endian f8 and f4 are supported")),
    };
    match dict_value(header, "fortran_order")?.trim() {
        "False" => {}
        "True" => return Err("Fortran-order arrays are not supported; save in C order".into()),
        other => return Err(format!("fortran_order is `{other}`, expected True or False")),
    }
    let shape = parse_shape(dict_value(header, "shape")?)?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows the address space")?;
    let esize = match elem {
        Elem::F64 => 8,
        Elem::F32 => 4,
    };
    let payload = &bytes[data_start..];
    if payload.len() != count * esize {
        return Err(format!(
            "shape {shape:?} needs {} data bytes, file has {}",
            count * esize,
            payload.len()
        ));
    }
    let data = match elem {
        Elem::F64 => payload
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Elem::F32 => payload
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
    };
    Ok(NpyArray { shape, data })
}

/// The text after `'key':` up to the next top-level comma or the closing brace.
fn dict_value<'a>(header: &'a str, key: &str) -> std::result::Result<&'a str, String> {
    let pat_single = format!("'{key}'");
    let pat_double = format!("\"{key}\"");
    let at = header
        .find(&pat_single)
        .map(|i| i + pat_single.len())
        .or_else(|| header.find(&pat_double).map(|i| i + pat_double.len()))
        .ok_or_else(|| format!("the .npy header has no `{key}` entry"))?;
    let rest = header[at..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .ok_or_else(|| format!("the .npy header entry `{key}` has no value"))?
        .trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Ok(rest[..i].trim()),
            _ => {}
        }
        if depth < 0 {
            break;
        }
    }
    Err(format!("the .npy header entry `{key}` is not terminated"))
}

fn parse_shape(s: &str) -> std::result::Result<Vec<usize>, String> {
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("shape `{s}` is not a tuple"))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<usize>().map_err(|_| format!("shape entry `{p}` is not a size")))
        .collect()
}

/// Write a C-order `<f4` array of `shape` (its product must equal `data.len()`).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    std::fs::write(path, to_bytes_f32(shape, data)?).at(path)
}

/// The bytes of a version 1.0 `.npy` file holding `data` as `<f4` of `shape`.
pub fn to_bytes_f32(shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(Error::Invalid(format!(
            "npy: shape {shape:?} holds {count} values, given {}",
            data.len()
        )));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // The data must start on a 64-byte boundary; the header ends with a newline.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    if header.len() > u16::MAX as usize {
        return Err(Error::Invalid(format!("npy: shape {shape:?} makes the header too long")));
    }
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_and_alignment() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        let bytes = to_bytes_f32(&[3, 4], &data).unwrap();
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let a = parse(&bytes).unwrap();
        assert_eq!(a.shape, vec![3, 4]);
        assert_eq!(a.data, data.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert_eq!(a.row(1), &[1.0, 1.5, 2.0, 2.5]);
        let one = parse(&to_bytes_f32(&[2], &[1.0, 2.0]).unwrap()).unwrap();
        assert_eq!(one.shape, vec![2]);
    }

    #[test]
    fn reads_f64_written_by_numpy() {
        // The byte layout numpy 1.x writes for np.array([[1.5, -2.0]]).
        let mut header =
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }".to_string();
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&1.5f64.to_le_bytes());
        bytes.extend_from_slice(&(-2.0f64).to_le_bytes());
        let a = parse(&bytes).unwrap();
        assert_eq!(a.shape, vec![1, 2]);
        assert_eq!(a.data, vec![1.5, -2.0]);
    }

    #[test]
    fn malformed_files_say_what_is_wrong() {
        let good = to_bytes_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let err = |b: &[u8]| parse(b).unwrap_err();
        assert!(err(b"PK\x03\x04 not npy").contains("magic"));
        assert!(err(&good[..good.len() - 4]).contains("needs 16 data bytes"));
        // Same-length edits of the header text; the binary parts stay as they are.
        let swap = |from: &str, to: &str| {
            assert_eq!(from.len(), to.len());
            let mut b = good.clone();
            let at = b.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
            b[at..at + to.len()].copy_from_slice(to.as_bytes());
            b
        };
        assert!(err(&swap("<f4", ">f4")).contains("little-endian"));
        assert!(err(&swap("<f4", "<i8")).contains("<i8"));
        assert!(err(&swap("'fortran_order': False", "'fortran_order': True ")).contains("Fortran"));
        assert!(err(&swap("(2, 2)", "(2, x)")).contains("`x`"));
        assert!(err(&swap("'shape'", "'shope'")).contains("shape"));
        let mut v9 = good.clone();
        v9[6] = 9;
        assert!(err(&v9).contains("version 9"));
        assert!(to_bytes_f32(&[3], &[1.0]).is_err());
    }
}
