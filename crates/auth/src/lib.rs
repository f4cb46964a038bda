//! Who a client is and what it may do. Identities come from an htpasswd file (Basic
//! credentials, `htpasswd.rs`) or from signed tokens (`token.rs`: the ones pier's token service
//! issues, or an external issuer's); groups come from the configuration; [`rules`] grant
//! actions on repository globs to users, groups, `anonymous` or `authenticated`, optionally
//! only from some client addresses. [`Auth`] ties them together and answers the one question
//! the HTTP front asks: which actions does this caller have on this repository.
//!
//! Architecture invariant: this crate knows nothing of HTTP frameworks, storage or upstreams.
//! It takes credentials, tokens and addresses and returns identities and decisions.

pub mod htpasswd;
pub mod login;
pub mod rules;
pub mod token;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

pub use htpasswd::Htpasswd;
pub use ipnet::IpNet;
pub use login::{FailedLogins, Limited, LimitedBy, LoginLimits};
pub use rules::{Policy, Rule, Subject};
pub use token::{Access, Claims, ExternalIssuer, Scope, Signer, Verifier};

/// A set of actions: `pull`, `push`, `delete` on repositories and `admin` of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    pub const PULL: Actions = Actions(1);
    pub const PUSH: Actions = Actions(2);
    pub const DELETE: Actions = Actions(4);
    pub const ADMIN: Actions = Actions(8);
    /// What Docker's `*` means in a scope: every repository action.
    pub const REPOSITORY: Actions = Actions(7);

    pub fn contains(self, other: Actions) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    pub fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// One action word as configurations and scopes write it.
    pub fn parse(word: &str) -> Option<Actions> {
        match word {
            "pull" => Some(Actions::PULL),
            "push" => Some(Actions::PUSH),
            "delete" => Some(Actions::DELETE),
            "admin" => Some(Actions::ADMIN),
            "*" => Some(Actions::REPOSITORY),
            _ => None,
        }
    }

    /// A comma-separated list (`pull,push`); unknown words are ignored, as Docker's token
    /// servers ignore actions they do not grant.
    pub fn parse_list(list: &str) -> Actions {
        list.split(',')
            .filter_map(|w| Actions::parse(w.trim()))
            .fold(Actions::NONE, Actions::union)
    }

    /// The action words, in a fixed order.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Actions::PULL, "pull"),
            (Actions::PUSH, "push"),
            (Actions::DELETE, "delete"),
            (Actions::ADMIN, "admin"),
        ]
        .into_iter()
        .filter(|(a, _)| self.contains(*a))
        .map(|(_, n)| n)
        .collect()
    }
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Identity {
    /// No credentials.
    Anonymous,
    /// A user of the htpasswd file, with the groups the configuration gives it.
    User { name: String, groups: Vec<String> },
    /// The bearer of a valid token: it may do what the token's `access` claims grant.
    Token {
        subject: String,
        access: Vec<Access>,
    },
}

impl Identity {
    /// The name audit lines and metrics use.
    pub fn name(&self) -> &str {
        match self {
            Identity::Anonymous => "anonymous",
            Identity::User { name, .. } => name,
            Identity::Token { subject, .. } if subject.is_empty() => "anonymous",
            Identity::Token { subject, .. } => subject,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self, Identity::Anonymous)
    }
}

/// Why a caller could not be identified, or the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("wrong user name or password")]
    BadCredentials,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("auth configuration: {0}")]
    Config(String),
}

/// Where pier's token service gets its signing key.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// The `iss` of the tokens pier issues.
    pub issuer: String,
    /// How long an issued token is valid.
    pub ttl: Duration,
    /// A PKCS#8 PEM file with an EC P-256 private key.
    pub key_file: PathBuf,
    /// Create `key_file` with a new key when it does not exist.
    pub generate: bool,
    /// The audience (`service`) tokens are issued for; `None`: whatever the client asks for,
    /// and tokens are then checked for issuer and signature only.
    pub service: Option<String>,
}

/// Everything [`Auth`] is built from; the binary fills it from the `[auth]` table.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub htpasswd: Option<PathBuf>,
    /// Group name to its users.
    pub groups: HashMap<String, Vec<String>>,
    pub rules: Vec<Rule>,
    /// Client addresses allowed at all; every address when empty.
    pub allow: Vec<IpNet>,
    /// pier's own token service (`/token`), when on.
    pub token: Option<TokenSettings>,
    /// Tokens of an external issuer, accepted beside pier's own.
    pub external: Option<ExternalIssuer>,
}

/// The identities, rules and token keys of one node.
pub struct Auth {
    htpasswd: Option<Htpasswd>,
    /// User to the groups it is in.
    groups: HashMap<String, Vec<String>>,
    policy: Policy,
    allow: Vec<IpNet>,
    signer: Option<Signer>,
    verifier: Verifier,
    service: Option<String>,
}

impl Auth {
    pub fn new(s: AuthSettings) -> Result<Auth, AuthError> {
        let htpasswd = s.htpasswd.as_deref().map(Htpasswd::open).transpose()?;
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for (group, users) in &s.groups {
            for u in users {
                groups.entry(u.clone()).or_default().push(group.clone());
            }
        }
        for v in groups.values_mut() {
            v.sort();
        }
        let signer = s.token.as_ref().map(Signer::load).transpose()?;
        let mut verifier = Verifier::default();
        if let (Some(signer), Some(t)) = (&signer, &s.token) {
            verifier.trust_own(signer, &t.issuer, t.service.clone());
        }
        if let Some(ext) = &s.external {
            verifier.trust_external(ext)?;
        }
        let rules = if s.rules.is_empty() {
            // With no rules, every authenticated user may do everything, as a registry with
            // only an htpasswd file does; anonymous callers may do nothing.
            vec![Rule {
                repos: vec!["**".into()],
                grant: Actions::REPOSITORY.union(Actions::ADMIN),
                to: vec![Subject::Authenticated],
                allow: Vec::new(),
            }]
        } else {
            s.rules
        };
        Ok(Auth {
            htpasswd,
            groups,
            policy: Policy::new(rules),
            allow: s.allow,
            service: s.token.as_ref().and_then(|t| t.service.clone()),
            signer,
            verifier,
        })
    }

    /// Whether `ip` may talk to this node at all (the global allow-list).
    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        rules::ip_allowed(&self.allow, ip)
    }

    /// Whether pier issues tokens (clients are then challenged with `Bearer`, not `Basic`).
    pub fn token_service(&self) -> bool {
        self.signer.is_some()
    }

    /// The configured service name, if any (else the request's host stands in).
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }

    /// Whether anonymous callers have any grant at all; without one, `/v2/` challenges them.
    pub fn anonymous_has_grants(&self) -> bool {
        self.policy.anonymous_has_grants()
    }

    /// Identify Basic credentials against the htpasswd file.
    pub fn basic(&self, user: &str, password: &str) -> Result<Identity, AuthError> {
        match &self.htpasswd {
            Some(h) if h.verify(user, password) => Ok(Identity::User {
                name: user.to_string(),
                groups: self.groups.get(user).cloned().unwrap_or_default(),
            }),
            _ => Err(AuthError::BadCredentials),
        }
    }

    /// Identify a bearer token: pier's own or the external issuer's.
    pub fn bearer(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = self.verifier.verify(token)?;
        Ok(Identity::Token {
            subject: claims.sub,
            access: claims.access,
        })
    }

    /// The actions `who` has on `repo` when calling from `ip`.
    pub fn granted(&self, who: &Identity, repo: &str, ip: IpAddr) -> Actions {
        match who {
            Identity::Anonymous => self.policy.granted(None, &[], repo, ip, false),
            Identity::User { name, groups } => {
                self.policy.granted(Some(name), groups, repo, ip, false)
            }
            Identity::Token { access, .. } => token::granted(access, repo),
        }
    }

    /// The actions rules give `who` on `repo` by naming it (its user or one of its groups):
    /// what counts for a private upstream's images, where `anonymous` and `authenticated`
    /// grants do not.
    pub fn granted_by_name(&self, who: &Identity, repo: &str, ip: IpAddr) -> Actions {
        match who {
            Identity::User { name, groups } => {
                self.policy.granted(Some(name), groups, repo, ip, true)
            }
            _ => Actions::NONE,
        }
    }

    /// Whether `who` administers the node (`/api/v1/*`, `/ui/`). Tokens never do: the admin
    /// API takes Basic credentials.
    pub fn admin(&self, who: &Identity, ip: IpAddr) -> bool {
        match who {
            Identity::Anonymous => self.policy.admin(None, &[], ip),
            Identity::User { name, groups } => self.policy.admin(Some(name), groups, ip),
            Identity::Token { .. } => false,
        }
    }

    /// A token for `who` carrying, of each requested scope, the actions it is permitted
    /// (a scope permitted nothing is left out; it is not an error). `rules_name` gives the
    /// name rules see for a scope's repository (a mirrored `library/nginx` is
    /// `docker.io/library/nginx` to them); the token names it as the client asked.
    pub fn issue(
        &self,
        who: &Identity,
        service: &str,
        scopes: &[Scope],
        ip: IpAddr,
        rules_name: impl Fn(&str) -> String,
    ) -> Result<token::Issued, AuthError> {
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| AuthError::Config("the token service is off".into()))?;
        let mut access = Vec::new();
        for s in scopes {
            if s.kind != "repository" {
                continue;
            }
            let allowed = self
                .granted(who, &rules_name(&s.name), ip)
                .intersect(s.actions);
            if !allowed.is_empty() {
                access.push(Access {
                    kind: "repository".into(),
                    name: s.name.clone(),
                    actions: allowed.names().into_iter().map(String::from).collect(),
                });
            }
        }
        let subject = match who {
            Identity::Anonymous => "",
            other => other.name(),
        };
        signer.issue(subject, service, access, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_lists() {
        assert_eq!(
            Actions::parse_list("pull,push,bogus"),
            Actions::PULL.union(Actions::PUSH)
        );
        assert_eq!(Actions::parse_list("*").names(), ["pull", "push", "delete"]);
        assert!(Actions::parse_list("").is_empty());
    }
}
