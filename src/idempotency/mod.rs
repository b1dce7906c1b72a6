//! The idempotency gate's pure parts: the key, the fingerprint, the record
//! and the decision table. Nothing in here does I/O.

pub mod decision;
pub mod fingerprint;
pub mod key;
pub mod record;

/// Lower-case hex of a byte string (sha2 0.11 digests have no `LowerHex`).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}
