//! Validated lock names and their collision-free encodings.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The longest accepted lock name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 255;

/// A validated lock name: 1 to [`MAX_NAME_LEN`] bytes of UTF-8 without NUL.
///
/// Names are compared byte for byte: `a` and `A` are two locks. Backends that need a
/// restricted alphabet use [`LockName::encoded`], which is injective, so two different names
/// never map to the same server key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockName(Arc<str>);

impl LockName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self> {
        if name.is_empty() {
            return Err(Error::InvalidName("the name is empty".into()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidName(format!(
                "the name is {} bytes long, the limit is {MAX_NAME_LEN}",
                name.len()
            )));
        }
        if name.contains('\0') {
            return Err(Error::InvalidName("the name contains a NUL byte".into()));
        }
        Ok(LockName(Arc::from(name)))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name percent-encoded to `[A-Za-z0-9_-]` and `%XX`: safe as one path segment or
    /// key component on every backend (no `/`, `.` or `:`), and injective. At most
    /// `3 * MAX_NAME_LEN` bytes.
    pub fn encoded(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        for &b in self.0.as_bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                out.push(b as char);
            } else {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        out
    }

    /// The name that [`LockName::encoded`] turned into `encoded`, or `None` if `encoded` is
    /// not such an encoding (a key some other program wrote under the same prefix).
    pub fn decode(encoded: &str) -> Option<LockName> {
        let bytes = encoded.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'%' {
                let hex = encoded.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                out.push(b);
                i += 1;
            } else {
                return None;
            }
        }
        let name = LockName::new(&String::from_utf8(out).ok()?).ok()?;
        (name.encoded() == encoded).then_some(name)
    }

    /// A stable 64-bit FNV-1a hash of the name's bytes, for backends that lock on integer
    /// keys. Hashes can collide: a backend that uses it must resolve collisions itself.
    pub fn hash64(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in self.0.as_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for LockName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for LockName {
    type Error = Error;
    fn try_from(name: &str) -> Result<Self> {
        LockName::new(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_inverts_encoded_and_nothing_else() {
        for name in ["a", "jobs/nightly report", "ünï:cödé.%", "x-_9"] {
            let name = LockName::new(name).unwrap();
            assert_eq!(LockName::decode(&name.encoded()), Some(name));
        }
        for bad in ["", "a/b", "%4", "%zz", "%61", "%00"] {
            assert_eq!(LockName::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        assert!(matches!(LockName::new(""), Err(Error::InvalidName(_))));
        assert!(matches!(
            LockName::new(&"x".repeat(256)),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(LockName::new("a\0b"), Err(Error::InvalidName(_))));
        assert!(LockName::new(&"x".repeat(255)).is_ok());
        // 85 three-byte characters are exactly 255 bytes.
        assert!(LockName::new(&"€".repeat(85)).is_ok());
        assert!(LockName::new(&"€".repeat(86)).is_err());
    }

    #[test]
    fn encoding_is_injective_on_tricky_names() {
        let names = [
            "a",
            "A",
            "a/b",
            "a:b",
            "a%2Fb",
            "a%b",
            "a b",
            "a ",
            ".",
            "..",
            "a.b",
            "a_b",
            "a-b",
            "ロック",
            "🔒",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let e = LockName::new(n).unwrap().encoded();
            assert!(
                e.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b)),
                "{e}"
            );
            assert!(seen.insert(e.clone()), "{n} collides as {e}");
        }
        assert_eq!(LockName::new("a/b").unwrap().encoded(), "a%2Fb");
        assert_eq!(LockName::new("a%2Fb").unwrap().encoded(), "a%252Fb");
    }

    #[test]
    fn hash_is_stable() {
        // FNV-1a test vectors: the value must never change between releases.
        assert_eq!(LockName::new("a").unwrap().hash64(), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            LockName::new("foobar").unwrap().hash64(),
            0x8594_4171_f739_67e8
        );
    }
}
