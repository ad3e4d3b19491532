//! Feeds arbitrary bytes, cut at arbitrary points, to the frame decoder and
//! decodes every control message it yields. Run by hand:
//! `cargo +nightly fuzz run frame_decoder` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use procluster::protocol::{Control, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).max(1);
    let mut decoder = FrameDecoder::new(64 * 1024);
    for chunk in rest.chunks(cut) {
        decoder.push_bytes(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let _ = Control::decode(&frame.payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});
