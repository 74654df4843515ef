//! The CLIP tokenizer, built to give the same ids as transformers' (tokenizers-backed) `CLIPTokenizer`.
//!
//! The pipeline is the one transformers 5 assembles for CLIP from `vocab.json` + `merges.txt`, and the one a
//! CLIP `tokenizer.json` describes:
//!
//! * special tokens (`<|startoftext|>`, `<|endoftext|>`, the unknown and the pad token) are cut out of the raw
//!   text first, so they are recognised inside a prompt;
//! * normalisation: NFC, every whitespace run becomes one space, lowercase;
//! * pre-tokenisation: CLIP's split regex (contractions, letter runs, single digits, punctuation runs;
//!   whitespace dropped), then byte-level mapping (GPT-2 byte alphabet);
//! * byte-level BPE whose words end in `</w>`;
//! * `BOS + at most max_length - 2 tokens + EOS`, padded to `max_length` with the pad id (diffusers'
//!   `padding="max_length", truncation=True`).
//!
//! No ftfy / html unescaping is done: transformers' tokenizers-backed CLIP tokenizer does not do it either.

use std::collections::HashMap;

use serde_json::Value;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{ModelError, ModelSource, Result};

/// CLIP's beginning-of-text token.
const BOS_TOKEN: &str = "<|startoftext|>";
/// CLIP's end-of-text token (also its unknown and, for SD1.x, its pad token).
const EOS_TOKEN: &str = "<|endoftext|>";
/// `model_max_length` when the tokenizer config does not give a usable one.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Largest `model_max_length` taken from a config; transformers writes 1e30 for "no limit", which is no use here.
const MAX_SANE_MAX_LENGTH: u64 = 1 << 20;
/// CLIP's pre-tokenisation regex (the matches are kept, everything between them, i.e. whitespace, is dropped).
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The special token strings a CLIP tokenizer is configured with.
#[derive(Clone, Debug)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
}

impl SpecialTokens {
    fn clip_with_pad(pad: &str) -> Self {
        SpecialTokens {
            bos: BOS_TOKEN.to_string(),
            eos: EOS_TOKEN.to_string(),
            unk: EOS_TOKEN.to_string(),
            pad: pad.to_string(),
        }
    }
}

/// A CLIP BPE tokenizer producing fixed-length id sequences for a CLIP text encoder.
#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("{context}: {e}"))
}

/// Joins a component folder and a file name (`""` means the model root).
fn join(subfolder: &str, file: &str) -> String {
    let sub = subfolder.trim_end_matches('/');
    if sub.is_empty() {
        file.to_string()
    } else {
        format!("{sub}/{file}")
    }
}

/// Reads a special token entry of a tokenizer config: either a plain string or an AddedToken object.
fn token_entry(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Parses `merges.txt`: an optional `#version` header, then one `left right` pair per line.
fn parse_merges(merges_txt: &str) -> Result<Merges> {
    let mut merges = Vec::new();
    for (i, line) in merges_txt.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(ModelError::Tokenizer(format!(
                    "merges.txt line {}: expected two space-separated tokens, got {line:?}",
                    i + 1
                )))
            }
        }
    }
    Ok(merges)
}

/// The normaliser and pre-tokeniser transformers' CLIPTokenizer installs.
fn install_clip_pipeline(tokenizer: &mut Tokenizer) -> Result<()> {
    let replace = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
        .map_err(|e| tok_err("building the whitespace normaliser", e))?;
    let normalizer = NormalizerSequence::new(vec![NFC.into(), replace.into(), Lowercase.into()]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_REGEX.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tok_err("building the CLIP split regex", e))?;
    let pre_tokenizer =
        PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    Ok(())
}

impl ClipTokenizer {
    /// Loads `<subfolder>/tokenizer.json` when present, else `<subfolder>/vocab.json` + `merges.txt`; special tokens
    /// and `model_max_length` (default 77) come from `tokenizer_config.json` / `special_tokens_map.json` when present.
    pub fn load(source: &ModelSource, subfolder: &str) -> Result<Self> {
        let mut specials = SpecialTokens::clip_with_pad(EOS_TOKEN);
        let mut max_length = DEFAULT_MAX_LENGTH;
        // transformers reads tokenizer_config.json, then lets special_tokens_map.json override its tokens.
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let rel = join(subfolder, file);
            if !source.exists(&rel) {
                continue;
            }
            let config: Value = source.read_json(&rel)?;
            for (key, slot) in [
                ("bos_token", &mut specials.bos),
                ("eos_token", &mut specials.eos),
                ("unk_token", &mut specials.unk),
                ("pad_token", &mut specials.pad),
            ] {
                if let Some(token) = token_entry(&config, key) {
                    *slot = token;
                }
            }
            if let Some(n) = config.get("model_max_length").and_then(Value::as_u64) {
                if (2..=MAX_SANE_MAX_LENGTH).contains(&n) {
                    max_length = n as usize;
                }
            }
        }

        let json_rel = join(subfolder, "tokenizer.json");
        if source.exists(&json_rel) {
            let bytes = source.read(&json_rel)?;
            return Self::build_from_tokenizer_json(&bytes, &specials, max_length)
                .map_err(|e| in_file(e, &source.describe(), &json_rel));
        }
        let vocab_rel = join(subfolder, "vocab.json");
        let merges_rel = join(subfolder, "merges.txt");
        let vocab = source.read(&vocab_rel)?;
        let merges = source.read_string(&merges_rel)?;
        Self::build_from_vocab_merges(&vocab, &merges, &specials, max_length).map_err(|e| {
            in_file(
                e,
                &source.describe(),
                &format!("{vocab_rel} + {merges_rel}"),
            )
        })
    }

    /// Builds the tokenizer from the bytes of `vocab.json` and the text of `merges.txt` (CLIP's
    /// `<|startoftext|>` / `<|endoftext|>` specials), padding with `pad_token` to `max_length`.
    pub fn from_vocab_merges(
        vocab_json: &[u8],
        merges_txt: &str,
        pad_token: &str,
        max_length: usize,
    ) -> Result<Self> {
        Self::build_from_vocab_merges(
            vocab_json,
            merges_txt,
            &SpecialTokens::clip_with_pad(pad_token),
            max_length,
        )
    }

    /// Builds the tokenizer from the bytes of a CLIP `tokenizer.json`, padding with `pad_token` to `max_length`.
    pub fn from_tokenizer_json(bytes: &[u8], pad_token: &str, max_length: usize) -> Result<Self> {
        Self::build_from_tokenizer_json(bytes, &SpecialTokens::clip_with_pad(pad_token), max_length)
    }

    fn build_from_vocab_merges(
        vocab_json: &[u8],
        merges_txt: &str,
        specials: &SpecialTokens,
        max_length: usize,
    ) -> Result<Self> {
        let vocab: HashMap<String, u32> =
            serde_json::from_slice(vocab_json).map_err(|source| ModelError::Json {
                path: "vocab.json".to_string(),
                source,
            })?;
        if !vocab.contains_key(&specials.unk) {
            return Err(ModelError::Tokenizer(format!(
                "unknown token {:?} is not in the vocabulary",
                specials.unk
            )));
        }
        let vocab: Vocab = vocab.into_iter().collect();
        let merges = parse_merges(merges_txt)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(specials.unk.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err("building the BPE model", e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        install_clip_pipeline(&mut tokenizer)?;
        Self::finish(tokenizer, specials, max_length)
    }

    fn build_from_tokenizer_json(
        bytes: &[u8],
        specials: &SpecialTokens,
        max_length: usize,
    ) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_bytes(bytes).map_err(|e| tok_err("parsing tokenizer.json", e))?;
        Self::finish(tokenizer, specials, max_length)
    }

    /// Registers the special tokens (as transformers does: matched in the raw text, never normalised) and
    /// resolves their ids; truncation and padding are done by [`ClipTokenizer::encode`] itself.
    fn finish(
        mut tokenizer: Tokenizer,
        specials: &SpecialTokens,
        max_length: usize,
    ) -> Result<Self> {
        if max_length < 2 {
            return Err(ModelError::Tokenizer(format!(
                "max_length {max_length} leaves no room for the BOS and EOS tokens"
            )));
        }
        let id_of = |tokenizer: &Tokenizer, role: &str, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "{role} token {token:?} is not in the vocabulary (vocab size {})",
                    tokenizer.get_vocab_size(true)
                ))
            })
        };
        // Check before registering: adding a token that is not in the vocabulary would give it a fresh id.
        id_of(&tokenizer, "BOS", &specials.bos)?;
        id_of(&tokenizer, "EOS", &specials.eos)?;
        id_of(&tokenizer, "unknown", &specials.unk)?;
        id_of(&tokenizer, "pad", &specials.pad)?;
        let added: Vec<AddedToken> = [&specials.bos, &specials.eos, &specials.unk, &specials.pad]
            .into_iter()
            .map(|t| AddedToken::from(t.as_str(), true))
            .collect();
        tokenizer.add_special_tokens(&added);
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err("disabling truncation", e))?;
        tokenizer.with_padding(None);
        Ok(ClipTokenizer {
            bos_id: id_of(&tokenizer, "BOS", &specials.bos)?,
            eos_id: id_of(&tokenizer, "EOS", &specials.eos)?,
            pad_id: id_of(&tokenizer, "pad", &specials.pad)?,
            tokenizer,
            max_length,
        })
    }

    /// The BPE ids of `text` without BOS/EOS, truncation or padding.
    fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| tok_err("encoding", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// diffusers' `tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids`:
    /// BOS, at most `max_length - 2` tokens, EOS, then pad ids up to exactly `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let content = self.content_ids(text)?;
        let kept = content.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..kept]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// BOS + all tokens of `text` + EOS, neither truncated nor padded (to tell whether [`Self::encode`] truncates).
    pub fn encode_untruncated(&self, text: &str) -> Result<Vec<u32>> {
        let content = self.content_ids(text)?;
        let mut ids = Vec::with_capacity(content.len() + 2);
        ids.push(self.bos_id);
        ids.extend(content);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// The token string of an id, if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The length of every sequence [`Self::encode`] returns (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of the beginning-of-text token.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id of the end-of-text token.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// Adds the file to a tokenizer error's message.
fn in_file(err: ModelError, source_desc: &str, rel: &str) -> ModelError {
    match err {
        ModelError::Tokenizer(msg) => ModelError::Tokenizer(format!("{source_desc}/{rel}: {msg}")),
        ModelError::Json { source, .. } => ModelError::Json {
            path: format!("{source_desc}/{rel}"),
            source,
        },
        other => other,
    }
}
