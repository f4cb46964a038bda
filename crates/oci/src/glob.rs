//! Repository globs for allow and deny lists and authorization rules: `*` matches within one
//! path component, `**` matches across components.

/// Whether `pattern` matches all of `name`.
pub fn matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                let rest = &p[2..];
                (0..=n.len()).any(|i| go(rest, &n[i..]))
            }
            Some(b'*') => {
                let rest = &p[1..];
                let mut i = 0;
                loop {
                    if go(rest, &n[i..]) {
                        return true;
                    }
                    if i == n.len() || n[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some(&c) => n.first() == Some(&c) && go(&p[1..], &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("library/*", "library/nginx", true),
            ("library/*", "library/a/b", false),
            ("library/**", "library/a/b", true),
            ("**", "anything/at/all", true),
            ("*/nginx", "library/nginx", true),
            ("bitnami/*", "library/nginx", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*", "", true),
        ] {
            assert_eq!(matches(p, n), want, "{p} vs {n}");
        }
    }
}
