//! Lower-case hexadecimal, for ids and share secrets in share files and messages.

use zeroize::Zeroize;

/// Lower-case hex of `bytes`.
pub(crate) fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Decodes exactly `N` bytes of hex (either case). The error says what is wrong without
/// repeating the input, which may be secret.
pub(crate) fn decode_array<const N: usize>(s: &str) -> Result<[u8; N], String> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return Err(format!(
            "expected {} hex digits, found {}",
            2 * N,
            digits.len()
        ));
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = (hi << 4) | lo,
            _ => {
                out.zeroize();
                return Err(format!("not a hex digit at position {}", 2 * i + 1));
            }
        }
    }
    Ok(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}
