//! NRI's connection multiplexer (`nri-proto/src/mux.rs`): arbitrary bytes
//! as the trunk socket's stream. Every frame read must be one the encoder
//! would write for the bytes it consumed, and a bad header must end the
//! stream with an error rather than a panic or a huge allocation.

#![no_main]

use hyperbox_nri_proto::mux::{MAX_PAYLOAD, encode_frame, read_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut consumed = 0;
    // A slice never waits, so each read completes on first poll.
    while let Ok(Some(f)) = futures::executor::block_on(read_frame(&mut r)) {
        assert_ne!(f.conn, 0, "reserved connection accepted");
        assert!(f.payload.len() <= MAX_PAYLOAD);
        let bytes = encode_frame(f.conn, &f.payload);
        assert_eq!(&data[consumed..consumed + bytes.len()], bytes.as_slice());
        consumed += bytes.len();
        assert_eq!(data.len() - consumed, r.len());
    }
});
