//! Feeds arbitrary bytes to the frame decoder, cut at arbitrary points, with
//! file descriptors attached to arbitrary reads, and decodes every control
//! message it yields. Every frame must carry exactly the descriptors its
//! header declares, and no descriptor may stay open once the decoder and its
//! frames are dropped. Run by hand: `cargo +nightly fuzz run frame_decoder`
//! (from the repository root).
//!
//! The input: one byte for the chunk size, one byte `n`, then `n` bytes
//! saying how many descriptors (0 to 3) come with each chunk, then the
//! stream.
#![no_main]

use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use procluster::protocol::{Control, FrameDecoder, HEADER_LEN};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn dev_null() -> OwnedFd {
    std::fs::File::open("/dev/null")
        .expect("open /dev/null")
        .into()
}

fuzz_target!(|data: &[u8]| {
    let [cut, plan_len, rest @ ..] = data else {
        return;
    };
    let cut = usize::from(*cut).max(1);
    let (plan, stream) = rest.split_at(usize::from(*plan_len).min(rest.len()));
    let before = open_fds();
    {
        let mut decoder = FrameDecoder::new(64 * 1024);
        let mut frames = Vec::new();
        // Where the next frame's header starts in `stream`.
        let mut at = 0;
        'stream: for (i, chunk) in stream.chunks(cut).enumerate() {
            let count = plan.get(i).map_or(0, |b| b % 4);
            decoder.push(chunk, (0..count).map(|_| dev_null()).collect());
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        let declared = usize::from(stream[at + 3]);
                        assert_eq!(frame.fds.len(), declared, "the header declares {declared}");
                        at += HEADER_LEN + frame.payload.len();
                        let _ = Control::decode(&frame.payload);
                        frames.push(frame);
                    }
                    Ok(None) => break,
                    Err(_) => break 'stream,
                }
            }
        }
        let _ = decoder.finish();
    }
    assert_eq!(open_fds(), before, "a descriptor was leaked");
});
