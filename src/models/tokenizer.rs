//! CLIP tokenizer (to be written).
