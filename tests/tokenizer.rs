//! CLIP tokenizer against transformers' golden ids (tests/fixtures/tokenizer-cases.json).

use std::path::PathBuf;

use serde_json::Value;
use stepstream::models::tokenizer::ClipTokenizer;
use stepstream::models::{ModelError, ModelSource};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases() -> Value {
    let bytes =
        std::fs::read(fixtures().join("tokenizer-cases.json")).expect("tokenizer-cases.json");
    serde_json::from_slice(&bytes).expect("tokenizer-cases.json parses")
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn from_vocab_merges(dir: &str, pad: &str) -> ClipTokenizer {
    let vocab = read(&format!("{dir}/vocab.json"));
    let merges = String::from_utf8(read(&format!("{dir}/merges.txt"))).expect("utf-8 merges");
    ClipTokenizer::from_vocab_merges(&vocab, &merges, pad, 77).expect("tokenizer builds")
}

fn from_tokenizer_json(dir: &str, pad: &str) -> ClipTokenizer {
    ClipTokenizer::from_tokenizer_json(&read(&format!("{dir}/tokenizer.json")), pad, 77)
        .expect("tokenizer builds")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Checks every golden case of one vocabulary (`full` / `tiny`) under `key` (`input_ids` or
/// `input_ids_pad_exclamation`); returns the number of cases and panics listing every failure.
fn check_all(tok: &ClipTokenizer, vocab: &str, key: &str, label: &str) -> usize {
    let cases = cases();
    let list = cases["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    for case in list {
        let prompt = case["prompt"].as_str().expect("prompt");
        let expected = ids(&case[vocab][key]);
        let got = tok.encode(prompt).expect("encode");
        let mut problems = Vec::new();
        if got != expected {
            problems.push(format!("expected {expected:?}\n    got      {got:?}"));
        }
        // The recorded untruncated length and tokens were taken with the default pad token.
        if key == "input_ids" {
            let full = tok.encode_untruncated(prompt).expect("encode_untruncated");
            let n = case[vocab]["n_tokens_untruncated"].as_u64().expect("n") as usize;
            if full.len() != n {
                problems.push(format!("{} untruncated tokens, expected {n}", full.len()));
            }
            let tokens: Vec<String> = full
                .iter()
                .map(|&id| tok.id_to_token(id).unwrap_or_default())
                .collect();
            let expected_tokens: Vec<String> = case[vocab]["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(|t| t.as_str().expect("token").to_string())
                .collect();
            if tokens != expected_tokens {
                problems.push(format!("tokens {tokens:?} != {expected_tokens:?}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{prompt:?}:\n    {}", problems.join("\n    ")));
        }
    }
    println!(
        "{label}: {}/{} cases pass",
        list.len() - failures.len(),
        list.len()
    );
    assert!(
        failures.is_empty(),
        "{label}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    list.len()
}

#[test]
fn full_vocab_merges_matches_transformers() {
    let tok = from_vocab_merges("tokenizers/clip-full", "<|endoftext|>");
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(check_all(&tok, "full", "input_ids", "full"), 34);
}

#[test]
fn full_vocab_merges_pad_exclamation_matches_transformers() {
    let tok = from_vocab_merges("tokenizers/clip-full", "!");
    assert_eq!(tok.pad_id(), 0);
    check_all(&tok, "full", "input_ids_pad_exclamation", "full, pad '!'");
}

#[test]
fn tiny_vocab_merges_matches_transformers() {
    let tok = from_vocab_merges("tokenizers/clip-tiny", "<|endoftext|>");
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (1512, 1513, 1513)
    );
    check_all(&tok, "tiny", "input_ids", "tiny");
}

#[test]
fn tiny_vocab_merges_pad_exclamation_matches_transformers() {
    let tok = from_vocab_merges("tokenizers/clip-tiny", "!");
    check_all(&tok, "tiny", "input_ids_pad_exclamation", "tiny, pad '!'");
}

#[test]
fn tiny_tokenizer_json_matches_transformers() {
    let tok = from_tokenizer_json("tokenizers/clip-tiny", "<|endoftext|>");
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (1512, 1513, 1513)
    );
    check_all(&tok, "tiny", "input_ids", "tiny tokenizer.json");
}

#[test]
fn tiny_tokenizer_json_pad_exclamation_matches_transformers() {
    let tok = from_tokenizer_json("tokenizers/clip-tiny", "!");
    check_all(
        &tok,
        "tiny",
        "input_ids_pad_exclamation",
        "tiny tokenizer.json, pad '!'",
    );
}

#[test]
fn loads_from_model_dir() {
    let source = ModelSource::Dir(fixtures().join("models/tiny-sd15"));
    let tok = ClipTokenizer::load(&source, "tokenizer").expect("load");
    assert_eq!(tok.max_length(), 77);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (1512, 1513, 1513)
    );
    check_all(&tok, "tiny", "input_ids", "tiny-sd15/tokenizer via load");
}

#[test]
fn load_prefers_tokenizer_json_and_reads_config() {
    // clip-tiny has tokenizer.json next to vocab.json/merges.txt; load it as a model root ("" subfolder).
    let source = ModelSource::Dir(fixtures().join("tokenizers/clip-tiny"));
    let tok = ClipTokenizer::load(&source, "").expect("load");
    check_all(&tok, "tiny", "input_ids", "clip-tiny via load");

    // The full vocabulary has no tokenizer.json: vocab.json + merges.txt.
    let source = ModelSource::Dir(fixtures().join("tokenizers/clip-full"));
    let tok = ClipTokenizer::load(&source, "").expect("load");
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.pad_id(), 49407);
}

#[test]
fn load_takes_pad_token_from_special_tokens_map() {
    // An SD2.x / SDXL tokenizer_2 style folder: pad '!' (given as an AddedToken object in the config).
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("tokenizer_2");
    std::fs::create_dir_all(&sub).expect("mkdir");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join("tokenizers/clip-tiny").join(f), sub.join(f)).expect("copy");
    }
    std::fs::write(
        sub.join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "pad_token": "<|endoftext|>"}"#,
    )
    .expect("write");
    std::fs::write(
        sub.join("special_tokens_map.json"),
        r#"{"pad_token": {"content": "!", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false}}"#,
    )
    .expect("write");
    let tok = ClipTokenizer::load(&ModelSource::Dir(dir.path().to_path_buf()), "tokenizer_2")
        .expect("load");
    assert_eq!(tok.pad_id(), 0);
    check_all(
        &tok,
        "tiny",
        "input_ids_pad_exclamation",
        "tiny via load, pad '!'",
    );
}

#[test]
fn load_from_embedded_source() {
    fn leak(bytes: Vec<u8>) -> &'static [u8] {
        Box::leak(bytes.into_boxed_slice())
    }
    let files: &'static [(&'static str, &'static [u8])] = Box::leak(Box::new([
        (
            "tokenizer/vocab.json",
            leak(read("models/tiny-sd15/tokenizer/vocab.json")),
        ),
        (
            "tokenizer/merges.txt",
            leak(read("models/tiny-sd15/tokenizer/merges.txt")),
        ),
    ]));
    let source = ModelSource::Embedded {
        name: "tiny",
        files,
    };
    let tok = ClipTokenizer::load(&source, "tokenizer").expect("load");
    assert_eq!(tok.max_length(), 77);
    check_all(&tok, "tiny", "input_ids", "tiny embedded");
}

#[test]
fn readme_example() {
    let tok = from_vocab_merges("tokenizers/clip-full", "<|endoftext|>");
    let got = tok
        .encode("a photo of an astronaut riding a horse on mars")
        .expect("encode");
    let mut expected = vec![
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407,
    ];
    expected.resize(77, 49407);
    assert_eq!(got, expected);
}

#[test]
fn special_tokens_inside_text() {
    let tok = from_vocab_merges("tokenizers/clip-full", "<|endoftext|>");
    let ids = tok
        .encode_untruncated("<|startoftext|> special tokens <|endoftext|> inside text")
        .expect("encode");
    assert_eq!(ids.len(), 8);
    assert_eq!(&ids[..2], &[49406, 49406]);
    assert_eq!(ids[4], 49407);
    assert_eq!(ids[7], 49407);
}

#[test]
fn truncation_keeps_bos_75_tokens_eos() {
    let tok = from_vocab_merges("tokenizers/clip-full", "<|endoftext|>");
    let prompt = "a highly detailed digital painting of a castle, ".repeat(20);
    let untruncated = tok.encode_untruncated(&prompt).expect("encode");
    assert!(untruncated.len() > 77);
    let ids = tok.encode(&prompt).expect("encode");
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert_eq!(&ids[1..76], &untruncated[1..76]);

    // Exactly 75 content tokens: no truncation, no padding; 76: the last one is dropped.
    let a75 = "a ".repeat(75);
    let ids = tok.encode(&a75).expect("encode");
    assert_eq!(ids.len(), 77);
    assert!(ids[1..76].iter().all(|&i| i == 320));
    assert_eq!(ids[76], 49407);
    assert_eq!(tok.encode(&"a ".repeat(76)).expect("encode"), ids);

    // Empty prompt: BOS, EOS, padding.
    let empty = tok.encode("").expect("encode");
    assert_eq!(&empty[..2], &[49406, 49407]);
    assert!(empty[2..].iter().all(|&i| i == 49407));
}

#[test]
fn custom_max_length() {
    let vocab = read("tokenizers/clip-tiny/vocab.json");
    let merges = String::from_utf8(read("tokenizers/clip-tiny/merges.txt")).expect("utf-8");
    let tok = ClipTokenizer::from_vocab_merges(&vocab, &merges, "!", 8).expect("builds");
    assert_eq!(tok.max_length(), 8);
    let ids = tok.encode("a a a a a a a a a a").expect("encode");
    assert_eq!(ids, vec![1512, 320, 320, 320, 320, 320, 320, 1513]);
    assert_eq!(
        tok.encode("a").expect("encode"),
        vec![1512, 320, 1513, 0, 0, 0, 0, 0]
    );
    assert!(ClipTokenizer::from_vocab_merges(&vocab, &merges, "!", 1).is_err());
}

#[test]
fn unknown_pad_token_is_an_error() {
    let vocab = read("tokenizers/clip-tiny/vocab.json");
    let merges = String::from_utf8(read("tokenizers/clip-tiny/merges.txt")).expect("utf-8");
    let err = ClipTokenizer::from_vocab_merges(&vocab, &merges, "<pad>", 77)
        .expect_err("unknown pad token must fail");
    assert!(matches!(err, ModelError::Tokenizer(_)), "{err:?}");
    assert!(err.to_string().contains("<pad>"), "{err}");

    let err = ClipTokenizer::from_tokenizer_json(
        &read("tokenizers/clip-tiny/tokenizer.json"),
        "<pad>",
        77,
    )
    .expect_err("unknown pad token must fail");
    assert!(err.to_string().contains("<pad>"), "{err}");
}

#[test]
fn malformed_inputs_are_errors() {
    let merges = String::from_utf8(read("tokenizers/clip-tiny/merges.txt")).expect("utf-8");
    assert!(matches!(
        ClipTokenizer::from_vocab_merges(b"not json", &merges, "!", 77),
        Err(ModelError::Json { .. })
    ));
    let vocab = read("tokenizers/clip-tiny/vocab.json");
    assert!(ClipTokenizer::from_vocab_merges(&vocab, "#version: 0.2\na b c\n", "!", 77).is_err());
    assert!(ClipTokenizer::from_tokenizer_json(b"{}", "!", 77).is_err());
    let missing = ModelSource::Dir(fixtures().join("models/tiny-sd15"));
    assert!(matches!(
        ClipTokenizer::load(&missing, "no_such_folder"),
        Err(ModelError::MissingFile { .. })
    ));
}
