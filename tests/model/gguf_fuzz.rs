//! Property test: mutated GGUF files (bytes flipped, inserted, removed, the file cut,
//! a count or offset overwritten with a random 64-bit value) never make the reader or
//! the loader panic, allocate without bound or hang: each gives a clean error or a
//! valid model. The base is a tiny llama built in memory (tiny_gguf.rs), so a case
//! costs microseconds; the edits land in the header (counts, lengths, types, offsets)
//! half of the time.
#![allow(clippy::unwrap_used)]

use crate::tiny_gguf;

use moac_model::attention::Engine;
use moac_model::gguf::GgufMetadata;
use moac_model::weights::WeightMode;
use moac_model::Model;
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;
use tiny_gguf::{Gguf, TinyShape};

/// The base file and the length of its header (where the tensor data starts).
fn base() -> &'static (Vec<u8>, usize) {
    static BASE: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
    BASE.get_or_init(|| {
        let bytes = Gguf::tiny(TinyShape::default()).bytes();
        let meta = GgufMetadata::from_bytes(Path::new("base.gguf"), &bytes).unwrap();
        let header = meta.content().tensor_data_offset as usize;
        (bytes, header)
    })
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Cut(usize),
    /// A little-endian u64 written over 8 bytes: a count, a length or an offset.
    Word(usize, u64),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Positions in 0..1 are scaled to the file: the first half of the range to the
    // header, the second to the whole file.
    let pos = 0usize..2000;
    let word = prop_oneof![
        any::<u64>(),
        0u64..64,
        Just(u64::MAX),
        Just(1 << 32),
        Just(1 << 62)
    ];
    prop_oneof![
        (pos.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        (pos.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        pos.clone().prop_map(Edit::Remove),
        pos.clone().prop_map(Edit::Cut),
        (pos, word).prop_map(|(p, w)| Edit::Word(p, w)),
    ]
}

fn apply(edits: &[Edit]) -> Vec<u8> {
    let (base, header) = base();
    let mut b = base.clone();
    let at = |p: usize, len: usize| -> usize {
        if len == 0 {
            return 0;
        }
        if p < 1000 {
            p * header.min(&len) / 1000
        } else {
            (p - 1000) * len / 1000
        }
    };
    for e in edits {
        let len = b.len();
        match *e {
            Edit::Set(p, v) if len > 0 => {
                let i = at(p, len).min(len - 1);
                b[i] = v;
            }
            Edit::Insert(p, v) => {
                let i = at(p, len);
                b.insert(i, v);
            }
            Edit::Remove(p) if len > 0 => {
                let i = at(p, len).min(len - 1);
                b.remove(i);
            }
            Edit::Cut(p) => b.truncate(at(p, len)),
            Edit::Word(p, w) if len >= 8 => {
                let i = at(p, len).min(len - 8);
                b[i..i + 8].copy_from_slice(&w.to_le_bytes());
            }
            _ => {}
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// The header reader, in memory: an error naming the file, or content whose every
    /// tensor lies inside the file.
    #[test]
    fn mutated_headers_never_panic(edits in prop::collection::vec(edit(), 1..5)) {
        let bytes = apply(&edits);
        match GgufMetadata::from_bytes(Path::new("fuzz.gguf"), &bytes) {
            Err(e) => prop_assert!(e.to_string().contains("fuzz.gguf"), "{e}"),
            Ok(meta) => {
                let c = meta.content();
                for info in c.tensor_infos.values() {
                    let size = info.shape.elem_count() / info.ggml_dtype.block_size()
                        * info.ggml_dtype.type_size();
                    prop_assert!(c.tensor_data_offset + info.offset + size as u64 <= bytes.len() as u64);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// The whole loader (config, tensors, tokenizer, template source) from a file.
    #[test]
    fn mutated_models_load_or_fail_cleanly(edits in prop::collection::vec(edit(), 1..4)) {
        let bytes = apply(&edits);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("fuzz.gguf");
        std::fs::write(&path, &bytes).unwrap();
        for mode in [WeightMode::F32, WeightMode::Native] {
            match Model::load(&path, mode) {
                Err(e) => prop_assert!(e.to_string().contains("fuzz.gguf"), "{e}"),
                Ok(m) => {
                    // A model that loads runs a prompt (or fails cleanly).
                    if let Ok(ids) = m.prompt("ab") {
                        let mut attn = Engine::Reference.open(1, ids.len(), 1).unwrap();
                        let _ = m.llama.prefill(attn.as_mut(), &[&ids]);
                    }
                }
            }
        }
    }
}
