//! A task's or a result's bytes: inline in the frame when small, and from
//! a size up (`PoolConfig::memfd_threshold`) in a sealed memory file whose
//! descriptor rides with the frame. The receiver maps the file read-only
//! and decodes straight from its pages; the primary forwards a worker's
//! file to another worker without reading it. The seals (no write, no
//! resize) mean the sender can neither change the bytes under the reader
//! nor truncate the file under its mapping.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::Bytes;

/// Encoded bytes, here or in a sealed memory file.
#[derive(Clone, Debug, Default)]
pub(super) struct Payload {
    inline: Bytes,
    sealed: Option<Arc<OwnedFd>>,
}

impl Payload {
    pub(super) fn inline(bytes: Bytes) -> Self {
        Self {
            inline: bytes,
            sealed: None,
        }
    }

    /// The payload of a received frame: the file it carries, or the bytes
    /// after the envelope. Extra descriptors are closed.
    pub(super) fn received(bytes: Bytes, mut fds: Vec<OwnedFd>) -> Self {
        match fds.pop() {
            Some(fd) => Self {
                inline: Bytes::new(),
                sealed: Some(Arc::new(fd)),
            },
            None => Self::inline(bytes),
        }
    }

    /// What goes after the envelope in a frame, and the descriptors with it.
    pub(super) fn for_frame(&self) -> io::Result<(&[u8], Vec<OwnedFd>)> {
        match &self.sealed {
            Some(fd) => Ok((&[], vec![fd.try_clone()?])),
            None => Ok((&self.inline, Vec::new())),
        }
    }

    /// The bytes: a sealed file is mapped (read-only, no copy).
    ///
    /// # Errors
    /// When the file is not a sealed memory file or cannot be mapped.
    pub(super) fn bytes(&self) -> io::Result<Bytes> {
        match &self.sealed {
            Some(fd) => Ok(Bytes::from_owner(crate::sys::map_sealed(fd)?)),
            None => Ok(self.inline.clone()),
        }
    }

    /// Whether the bytes are in a memory file.
    #[cfg(test)]
    pub(super) fn is_sealed(&self) -> bool {
        self.sealed.is_some()
    }
}

/// Collects an encoding: in memory while it is small, in a new memory file
/// once it reaches `threshold` bytes (written straight there from then on).
pub(super) struct PayloadWriter {
    buf: Vec<u8>,
    threshold: Option<usize>,
    file: Option<std::fs::File>,
}

impl PayloadWriter {
    pub(super) fn new(threshold: Option<usize>) -> Self {
        Self {
            buf: Vec::new(),
            // Sealed memory files are Linux's.
            threshold: threshold.filter(|_| cfg!(any(target_os = "linux", target_os = "android"))),
            file: None,
        }
    }

    /// The payload; a memory file is sealed against writes and resizing
    /// first.
    pub(super) fn finish(mut self) -> io::Result<Payload> {
        self.flush_to_file()?;
        let Some(file) = self.file else {
            return Ok(Payload::inline(Bytes::from(self.buf)));
        };
        use rustix::fs::SealFlags;
        let seals = SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL;
        rustix::fs::fcntl_add_seals(&file, seals)?;
        Ok(Payload {
            inline: Bytes::new(),
            sealed: Some(Arc::new(OwnedFd::from(file))),
        })
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn spill(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Moves the encoding so far to a new memory file; the buffer then
    /// collects small writes for it.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn spill(&mut self) -> io::Result<()> {
        use rustix::fs::MemfdFlags;
        let fd = rustix::fs::memfd_create(
            "procluster-pool-payload",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        self.file = Some(std::fs::File::from(fd));
        self.flush_to_file()
    }

    fn flush_to_file(&mut self) -> io::Result<()> {
        if let Some(file) = &mut self.file {
            file.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Writes into a memory file gather in the buffer up to this size.
const FILE_BUFFER: usize = 64 * 1024;

impl Write for PayloadWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.file.is_none()
            && self
                .threshold
                .is_some_and(|t| self.buf.len() + bytes.len() >= t)
        {
            self.spill()?;
        }
        match &mut self.file {
            Some(_) if self.buf.len() + bytes.len() > FILE_BUFFER => {
                // Large writes go straight to the file: no copy through the
                // buffer.
                self.flush_to_file()?;
                match &mut self.file {
                    Some(file) if bytes.len() >= FILE_BUFFER => file.write_all(bytes),
                    _ => {
                        self.buf.extend_from_slice(bytes);
                        Ok(())
                    }
                }
            }
            _ => {
                self.buf.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(threshold: Option<usize>, bytes: &[u8]) -> Payload {
        let mut writer = PayloadWriter::new(threshold);
        writer.write_all(bytes).unwrap();
        writer.finish().unwrap()
    }

    #[test]
    fn small_payloads_stay_inline_and_large_ones_go_to_a_sealed_file() {
        let small = written(Some(1024), b"hello");
        assert!(!small.is_sealed());
        assert_eq!(&small.bytes().unwrap()[..], b"hello");

        let data: Vec<u8> = (0..100_000u32).map(|n| n as u8).collect();
        let large = written(Some(1024), &data);
        assert!(large.is_sealed());
        assert_eq!(&large.bytes().unwrap()[..], &data[..]);

        assert!(!written(None, &data).is_sealed(), "no threshold, no file");
    }

    #[test]
    fn many_small_writes_past_the_threshold_arrive_in_order() {
        let mut writer = PayloadWriter::new(Some(1000));
        let mut expected = Vec::new();
        for n in 0..200_000u32 {
            let byte = [(n % 253) as u8];
            writer.write_all(&byte).unwrap();
            expected.push(byte[0]);
            if n % 10_000 == 0 {
                let chunk = vec![(n % 7) as u8; 70_000];
                writer.write_all(&chunk).unwrap();
                expected.extend_from_slice(&chunk);
            }
        }
        let payload = writer.finish().unwrap();
        assert!(payload.is_sealed());
        assert!(payload.bytes().unwrap()[..] == expected[..]);
    }

    #[test]
    fn a_file_that_is_not_sealed_is_refused() {
        let fd = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, b"changeable").unwrap();
        let payload = Payload::received(Bytes::new(), vec![fd]);
        let error = payload.bytes().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    }

    #[test]
    fn a_sealed_file_cannot_be_written_or_shrunk_by_its_sender() {
        let payload = written(Some(4), b"sealed bytes");
        let (_, mut fds) = payload.for_frame().unwrap();
        let fd = fds.pop().unwrap();
        assert!(rustix::io::write(&fd, b"x").is_err());
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert_eq!(&payload.bytes().unwrap()[..], b"sealed bytes");
    }
}
