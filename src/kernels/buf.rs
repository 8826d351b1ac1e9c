//! `AlignedBuf`: the one aligned byte buffer of the crate, for tiled weights, quantized
//! activations and `O_DIRECT` reads alike.

use std::alloc::{self, Layout};

/// A zero-initialised, page-aligned (`AlignedBuf::ALIGN`) byte buffer. Large ones are mapped
/// straight from the OS and, on Linux, asked to be backed by 2 MiB pages: a stream through a big
/// matrix then takes no TLB miss every 4 KiB, which measurably raises the bandwidth a
/// matrix-vector product gets.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    /// Bytes mapped with mmap (0: from the global allocator).
    mapped: usize,
}

// The buffer is plain bytes owned by this value.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

/// Buffers from this size on are mapped.
#[cfg(target_os = "linux")]
const MAP_FROM: usize = 4 << 20;
#[cfg(target_os = "linux")]
const HUGE: usize = 2 << 20;

impl AlignedBuf {
    /// Alignment of every buffer: a page, which `O_DIRECT` needs and which covers the kernels'
    /// 64-byte aligned loads.
    pub const ALIGN: usize = 4096;

    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            let ptr = std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8;
            return AlignedBuf { ptr, len, mapped: 0 };
        }
        #[cfg(target_os = "linux")]
        if len >= MAP_FROM {
            if let Some(b) = Self::mapped(len) {
                return b;
            }
        }
        let layout = Layout::from_size_align(len, Self::ALIGN).expect("buffer size overflows");
        // Zeroed allocations of this size come straight from the kernel as untouched pages.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len, mapped: 0 }
    }

    /// Map `len` bytes (rounded up to whole huge pages) at a huge-page boundary; anonymous
    /// mappings are zero-filled.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Option<AlignedBuf> {
        let want = len.div_ceil(HUGE) * HUGE;
        let map_len = want + HUGE;
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return None;
            }
            let base = base as *mut u8;
            // Trim to an aligned window of `want` bytes.
            let head = base.align_offset(HUGE);
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            let ptr = base.add(head);
            let tail = map_len - head - want;
            if tail > 0 {
                libc::munmap(ptr.add(want) as *mut libc::c_void, tail);
            }
            // Advice only: without transparent huge pages this is a no-op.
            libc::madvise(ptr as *mut libc::c_void, want, libc::MADV_HUGEPAGE);
            Some(AlignedBuf { ptr, len, mapped: want })
        }
    }

    /// An empty buffer, to grow with `get`.
    pub fn new() -> AlignedBuf {
        AlignedBuf::zeroed(0)
    }

    /// The first `len` bytes, growing the buffer first (to a multiple of `ALIGN`, zeroed) if it
    /// is shorter; it never shrinks. Contents of earlier uses remain: callers read only what
    /// they wrote.
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.len {
            *self = AlignedBuf::zeroed(len.next_multiple_of(Self::ALIGN));
        }
        &mut self.as_mut_slice()[..len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held: `len`, under the name a growable buffer's users expect.
    pub fn capacity(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped != 0 {
            #[cfg(target_os = "linux")]
            unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.mapped);
            }
        } else if self.len != 0 {
            unsafe { alloc::dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, Self::ALIGN)) }
        }
    }
}

