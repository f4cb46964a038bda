//! Parsing of `Range` (blob GET) and `Content-Range` (chunk PATCH) headers.

/// A byte range to serve, end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeError {
    Malformed,
    Unsatisfiable,
}

/// Parse a `Range` header against a blob of `size` bytes. `Ok(None)` means serve everything:
/// pier answers several ranges at once with the whole blob, as RFC 9110 allows.
pub fn parse_range(header: &str, size: u64) -> Result<Option<ByteRange>, RangeError> {
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Malformed)?;
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.trim().split_once('-').ok_or(RangeError::Malformed)?;
    let num = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(RangeError::Malformed);
        }
        s.parse().map_err(|_| RangeError::Malformed)
    };
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n = num(suffix)?;
            if n == 0 || size == 0 {
                return Err(RangeError::Unsatisfiable);
            }
            (size.saturating_sub(n), size)
        }
        (first, "") => (num(first)?, size),
        (first, last) => {
            let (f, l) = (num(first)?, num(last)?);
            if l < f {
                return Err(RangeError::Malformed);
            }
            (f, l.saturating_add(1).min(size))
        }
    };
    if start >= size {
        return Err(RangeError::Unsatisfiable);
    }
    Ok(Some(ByteRange { start, end }))
}

/// Parse a chunk's `Content-Range`: `<start>-<end>` (inclusive), as the OCI specification
/// writes it, also accepting the RFC form `bytes <start>-<end>/<total|*>`.
pub fn parse_content_range(header: &str) -> Option<(u64, u64)> {
    let h = header.trim();
    let h = h
        .strip_prefix("bytes=")
        .or_else(|| h.strip_prefix("bytes "))
        .unwrap_or(h);
    let h = h.split('/').next()?;
    let (a, b) = h.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return None;
    }
    let (start, end) = (a.parse().ok()?, b.parse().ok()?);
    (end >= start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(h: &str, size: u64) -> String {
        match parse_range(h, size) {
            Ok(Some(r)) => format!("{}..{}", r.start, r.end),
            Ok(None) => "all".into(),
            Err(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(check("bytes=0-9", 100), "0..10");
        assert_eq!(check("bytes=90-", 100), "90..100");
        assert_eq!(check("bytes=-10", 100), "90..100");
        assert_eq!(check("bytes=-1000", 100), "0..100");
        assert_eq!(check("bytes=50-1000", 100), "50..100");
        assert_eq!(check("bytes=0-0,5-6", 100), "all");
        assert_eq!(check("bytes=100-", 100), "Unsatisfiable");
        assert_eq!(check("bytes=-0", 100), "Unsatisfiable");
        assert_eq!(check("bytes=0-0", 0), "Unsatisfiable");
        assert_eq!(check("bytes=9-1", 100), "Malformed");
        assert_eq!(check("items=0-1", 100), "Malformed");
        assert_eq!(check("bytes=a-b", 100), "Malformed");
        assert_eq!(check("bytes=-", 100), "Malformed");
        assert_eq!(check("bytes=+1-2", 100), "Malformed");
        assert_eq!(check("bytes=99999999999999999999999-", 100), "Malformed");
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes=5-5"), Some((5, 5)));
        assert_eq!(parse_content_range("9-1"), None);
        assert_eq!(parse_content_range("x-1"), None);
        assert_eq!(parse_content_range("-1"), None);
        assert_eq!(parse_content_range(""), None);
    }
}
