//! The run token, as both planes carry it: the standard `authorization: Bearer <token>` header,
//! so that proxies, gRPC tooling and logs' redaction rules recognise it.

use tonic::metadata::{Ascii, MetadataMap, MetadataValue};

/// The gRPC metadata key that carries the token.
pub const HEADER: &str = "authorization";

/// Why a call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The call carried no `authorization` header.
    Missing,
    /// It carried one, but not `Bearer <the run's token>`.
    Wrong,
}

impl Refusal {
    /// The refusal in words, for logs and events (never the token itself).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing token",
            Refusal::Wrong => "wrong token",
        }
    }
}

/// The header value for `token`; fails if the token is not printable ASCII.
pub fn bearer(token: &str) -> Result<MetadataValue<Ascii>, String> {
    format!("Bearer {token}").parse().map_err(|_| "the run token must be printable ASCII (it travels in the `authorization` header)".into())
}

/// Whether `metadata` carries `authorization: Bearer <token>`. The comparison takes the same
/// time whatever prefix matches, so timing does not reveal the token.
pub fn check(metadata: &MetadataMap, token: &str) -> Result<(), Refusal> {
    let Some(got) = metadata.get(HEADER) else { return Err(Refusal::Missing) };
    let presented = got.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) { Ok(()) } else { Err(Refusal::Wrong) }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let mut m = MetadataMap::new();
        assert_eq!(check(&m, "s3cret"), Err(Refusal::Missing));
        m.insert(HEADER, bearer("s3cret").unwrap());
        assert_eq!(check(&m, "s3cret"), Ok(()));
        assert_eq!(check(&m, "s3cre"), Err(Refusal::Wrong));
        assert_eq!(check(&m, "s3cret!"), Err(Refusal::Wrong));
        m.insert(HEADER, "s3cret".parse().unwrap());
        assert_eq!(check(&m, "s3cret"), Err(Refusal::Wrong), "a bare token without `Bearer ` is refused");
        assert!(bearer("bad\ntoken").is_err());
    }
}
