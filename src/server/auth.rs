//! Bearer-token authentication for the Diffusion RPCs: tokens from a file, one per line,
//! compared in constant time, never logged.

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::MetadataMap;

use crate::engine::EngineError;

/// The accepted tokens. `Debug` shows only how many there are.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} redacted)", self.0.len())
    }
}

impl Tokens {
    /// Tokens given directly (empty lines are not tokens).
    pub fn new<I: IntoIterator<Item = String>>(tokens: I) -> Result<Tokens, String> {
        let list: Vec<Vec<u8>> = tokens
            .into_iter()
            .map(|t| t.trim().as_bytes().to_vec())
            .filter(|t| !t.is_empty())
            .collect();
        if list.is_empty() {
            return Err("no tokens given".into());
        }
        Ok(Tokens(Arc::new(list)))
    }

    /// Reads one token per line from `path`.
    pub fn from_file(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Tokens::new(text.lines().map(str::to_string))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks `authorization: Bearer <token>` against the accepted tokens.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), EngineError> {
        let value = metadata
            .get("authorization")
            .ok_or_else(|| EngineError::Unauthenticated("missing authorization metadata".into()))?;
        let value = value.as_bytes();
        let token = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
            .ok_or_else(|| {
                EngineError::Unauthenticated("authorization must be `Bearer <token>`".into())
            })?;
        // Compare against every token, without early exit, so timing says nothing.
        let mut ok = false;
        for t in self.0.iter() {
            ok |= constant_time_eq(t, token);
        }
        if ok {
            Ok(())
        } else {
            Err(EngineError::Unauthenticated("invalid token".into()))
        }
    }
}

/// Equality whose running time depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[test]
    fn only_listed_bearer_tokens_pass() {
        let t = Tokens::new(["alpha".to_string(), " beta ".into(), "".into()]).unwrap();
        assert!(t.check(&md("Bearer alpha")).is_ok());
        assert!(t.check(&md("Bearer beta")).is_ok());
        for bad in [
            "Bearer alph",
            "Bearer alphaa",
            "Bearer ",
            "alpha",
            "Basic alpha",
        ] {
            assert!(
                matches!(t.check(&md(bad)), Err(EngineError::Unauthenticated(_))),
                "{bad}"
            );
        }
        assert!(t.check(&MetadataMap::new()).is_err());
        assert_eq!(format!("{t:?}"), "Tokens(2 redacted)");
        assert!(Tokens::new(["  ".to_string()]).is_err());
    }

    #[test]
    fn constant_time_eq_is_plain_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
