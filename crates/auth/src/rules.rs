//! Authorization rules: each grants actions on repository globs (`*` within a path component,
//! `**` across them; hosted and mirrored names alike) to subjects, optionally only to callers
//! from some networks. A caller's actions on a repository are the union of every rule that
//! matches it; there are no deny rules, so the order of rules does not matter.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::Actions;

/// Whom a rule grants to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Callers without credentials (and everybody else: an anonymous grant is a floor).
    Anonymous,
    /// Every user with valid credentials.
    Authenticated,
    User(String),
    Group(String),
}

impl FromStr for Subject {
    type Err = String;

    fn from_str(s: &str) -> Result<Subject, String> {
        match s {
            "anonymous" => Ok(Subject::Anonymous),
            "authenticated" => Ok(Subject::Authenticated),
            _ => match s.split_once(':') {
                Some(("user", u)) if !u.is_empty() => Ok(Subject::User(u.into())),
                Some(("group", g)) if !g.is_empty() => Ok(Subject::Group(g.into())),
                _ => Err(format!(
                    "{s:?} is not a subject: write \"anonymous\", \"authenticated\", \
                     \"user:NAME\" or \"group:NAME\""
                )),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub repos: Vec<String>,
    pub grant: Actions,
    pub to: Vec<Subject>,
    /// When not empty, the rule applies only to callers from these networks.
    pub allow: Vec<IpNet>,
}

impl Rule {
    /// Whether the rule is for this caller; `by_name` counts only rules naming its user or
    /// one of its groups.
    fn applies(&self, user: Option<&str>, groups: &[String], ip: IpAddr, by_name: bool) -> bool {
        let named = self.to.iter().any(|s| match s {
            Subject::Anonymous => !by_name,
            Subject::Authenticated => !by_name && user.is_some(),
            Subject::User(u) => user == Some(u.as_str()),
            Subject::Group(g) => user.is_some() && groups.iter().any(|x| x == g),
        });
        named && ip_allowed(&self.allow, ip)
    }
}

/// Whether `ip` is in one of `nets`; every address is when the list is empty.
pub fn ip_allowed(nets: &[IpNet], ip: IpAddr) -> bool {
    // An IPv4 client on a dual-stack socket appears as ::ffff:a.b.c.d.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    nets.is_empty() || nets.iter().any(|n| n.contains(&ip))
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    pub fn new(rules: Vec<Rule>) -> Policy {
        Policy { rules }
    }

    /// The union of the repository actions of every rule for this caller and repository.
    pub fn granted(
        &self,
        user: Option<&str>,
        groups: &[String],
        repo: &str,
        ip: IpAddr,
        by_name: bool,
    ) -> Actions {
        self.rules
            .iter()
            .filter(|r| r.applies(user, groups, ip, by_name))
            .filter(|r| r.repos.iter().any(|g| pier_oci::glob::matches(g, repo)))
            .fold(Actions::NONE, |a, r| a.union(r.grant))
            .intersect(Actions::REPOSITORY)
    }

    /// Whether a rule with `admin` is for this caller. Admin is node-wide: the rule's
    /// repositories do not narrow it.
    pub fn admin(&self, user: Option<&str>, groups: &[String], ip: IpAddr) -> bool {
        self.rules
            .iter()
            .any(|r| r.grant.contains(Actions::ADMIN) && r.applies(user, groups, ip, false))
    }

    pub fn anonymous_has_grants(&self) -> bool {
        self.rules
            .iter()
            .any(|r| !r.grant.is_empty() && r.to.contains(&Subject::Anonymous))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(repos: &[&str], grant: &str, to: &[&str], allow: &[&str]) -> Rule {
        Rule {
            repos: repos.iter().map(|s| s.to_string()).collect(),
            grant: Actions::parse_list(grant),
            to: to.iter().map(|s| s.parse().expect("subject")).collect(),
            allow: allow.iter().map(|s| s.parse().expect("net")).collect(),
        }
    }

    #[test]
    fn grants_are_the_union_of_matching_rules() {
        let p = Policy::new(vec![
            rule(&["public/**"], "pull", &["anonymous"], &[]),
            rule(&["team/**"], "pull,push", &["group:ci", "user:carol"], &[]),
            rule(
                &["team/secret"],
                "delete",
                &["authenticated"],
                &["10.1.0.0/16"],
            ),
            rule(&["**"], "pull,push,delete,admin", &["user:root"], &[]),
        ]);
        let here: IpAddr = "10.1.2.3".parse().expect("ip");
        let there: IpAddr = "192.0.2.1".parse().expect("ip");
        let ci = vec!["ci".to_string()];
        let check = |user: Option<&str>, groups: &[String], repo: &str, ip, want: &str| {
            assert_eq!(
                p.granted(user, groups, repo, ip, false).names().join(","),
                want,
                "{user:?} {groups:?} {repo} {ip}"
            );
        };
        check(None, &[], "public/a/b", there, "pull");
        check(None, &[], "team/app", there, "");
        check(Some("alice"), &ci, "team/app", there, "pull,push");
        check(Some("alice"), &ci, "public/x", there, "pull");
        check(Some("carol"), &[], "team/x/y", there, "pull,push");
        check(Some("carol"), &[], "team/secret", here, "pull,push,delete");
        check(Some("carol"), &[], "team/secret", there, "pull,push");
        check(Some("dave"), &ci, "other", there, "");
        check(Some("root"), &[], "any/thing", there, "pull,push,delete");
        // A group grant needs a user: an anonymous caller claiming groups gets nothing.
        check(None, &ci, "team/app", there, "");
        assert!(p.admin(Some("root"), &[], there));
        assert!(!p.admin(Some("carol"), &[], there));
        assert!(p.anonymous_has_grants());
        assert_eq!(
            p.granted(Some("alice"), &ci, "public/x", there, true),
            Actions::NONE,
            "by name: anonymous grants do not count"
        );
    }

    #[test]
    fn subjects_parse() {
        assert_eq!("user:a".parse(), Ok(Subject::User("a".into())));
        assert!("user:".parse::<Subject>().is_err());
        assert!("everyone".parse::<Subject>().is_err());
    }

    #[test]
    fn mapped_v4_addresses_match_v4_networks() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().expect("net")];
        assert!(ip_allowed(&nets, "::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!ip_allowed(&nets, "::1".parse().expect("ip")));
        assert!(ip_allowed(&[], "::1".parse().expect("ip")));
    }
}
