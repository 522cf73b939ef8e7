//! The tar → EROFS writer over arbitrary bytes read as an uncompressed layer
//! tar, written into memory. Any input may be refused with an error; none may
//! panic, hang or make the writer allocate far beyond what it was given.

#![no_main]

use std::io::Cursor;

use hyperbox_erofs::writer::{Options, convert_with};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the options, so both settings are explored.
    let Some((&flags, tar)) = data.split_first() else {
        return;
    };
    let options = Options {
        allow_devices: flags & 1 == 1,
        ..Options::default()
    };
    let mut image = Cursor::new(Vec::new());
    if convert_with(tar, &mut image, options).is_ok() {
        let image = image.into_inner();
        // A finished image holds at least its superblock's block.
        assert!(image.len() >= 4096, "image of {} bytes", image.len());
        assert_eq!(image.len() % 4096, 0, "image not block-aligned");
    }
});
