//! The hyperbox index document (`registry/src/index.rs`): arbitrary bytes
//! as the artifact's config. What it accepts must satisfy the checks the
//! lazy path relies on, and survive a round trip through JSON.

#![no_main]

use hyperbox_registry::index::Index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(ix) = Index::parse(data, "fuzz") else {
        return;
    };
    assert!(ix.chunk_size >= 4096 && ix.chunk_size.is_multiple_of(4096));
    for l in &ix.layers {
        assert!(l.data_end >= 4096 && l.data_end <= l.size);
        assert_eq!(l.chunks.len() as u64, l.size.div_ceil(ix.chunk_size));
    }
    let again = serde_json::to_vec(&ix).expect("an index serialises");
    assert_eq!(Index::parse(&again, "fuzz").expect("round trip"), ix);
});
