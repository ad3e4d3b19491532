//! Forwarding a worker's captured output line by line.

use std::fmt;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::WorkerId;

/// Which of a worker's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// `"stdout"` or `"stderr"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One line of a worker's output, as handed to
/// [`Stdio::Callback`](crate::primary::Stdio::Callback).
#[derive(Debug, Clone, Copy)]
pub struct OutputLine<'a> {
    /// The worker's id.
    pub worker: WorkerId,
    /// Its slot index, when it was forked for one.
    pub index: Option<usize>,
    /// Its process id.
    pub pid: u32,
    /// The stream the line came from.
    pub stream: Stream,
    /// The line's bytes, without its `\n` (at most [`MAX_LINE`] of them:
    /// a longer line comes in several pieces). Not necessarily UTF-8.
    pub line: &'a [u8],
}

/// A callback that receives each line of workers' output.
pub type OutputHook = Arc<dyn Fn(OutputLine<'_>) + Send + Sync>;

/// Longest line kept whole; a longer one is emitted in pieces of this size so
/// a worker cannot make the primary buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;

/// Splits a byte stream into lines: whole lines as they complete, overlong
/// lines in `MAX_LINE` pieces, and the unterminated tail at the end.
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; calls `emit` for each complete line (without its `\n`).
    pub(crate) fn push(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                emit_in_pieces(&bytes[..newline], &mut emit);
            } else {
                self.partial.extend_from_slice(&bytes[..newline]);
                emit_in_pieces(&self.partial, &mut emit);
                self.partial.clear();
            }
            bytes = &bytes[newline + 1..];
        }
        self.partial.extend_from_slice(bytes);
        while self.partial.len() >= MAX_LINE {
            emit(&self.partial[..MAX_LINE]);
            self.partial.drain(..MAX_LINE);
        }
    }

    /// Emits what is left (a last line without `\n`).
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(&self.partial);
            self.partial.clear();
        }
    }
}

fn emit_in_pieces(line: &[u8], emit: &mut impl FnMut(&[u8])) {
    if line.is_empty() {
        emit(line);
    }
    for piece in line.chunks(MAX_LINE) {
        emit(piece);
    }
}

/// Reads `stream` to its end, calling `emit` per line.
pub(crate) async fn forward_lines(mut stream: impl AsyncRead + Unpin, mut emit: impl FnMut(&[u8])) {
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => splitter.push(&buf[..n], &mut emit),
        }
    }
    splitter.finish(&mut emit);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = LineSplitter::default();
        for c in chunks {
            s.push(c, |l| out.push(l.to_vec()));
        }
        s.finish(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn empty_lines_are_kept() {
        assert_eq!(
            split(&[b"a\n\nb\n"]),
            vec![b"a".to_vec(), vec![], b"b".to_vec()]
        );
    }

    #[test]
    fn long_lines_come_in_bounded_pieces() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut input = long.clone();
        input.push(b'\n');
        let out = split(&[&input[..100], &input[100..]]);
        assert_eq!(
            out.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![MAX_LINE, MAX_LINE, 10]
        );
        assert_eq!(out.concat(), long);
    }
}
