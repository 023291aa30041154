//! The subjects limits attach to: a key, a user, a tenant.

/// A subject that limits attach to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Key(String),
    User(String),
    Tenant(String),
}

impl Subject {
    /// `key:k_…`, `user:…`, `tenant:…` — the text used in storage and usage reports.
    pub fn as_text(&self) -> String {
        match self {
            Subject::Key(k) => format!("key:{k}"),
            Subject::User(u) => format!("user:{u}"),
            Subject::Tenant(t) => format!("tenant:{t}"),
        }
    }

    pub fn parse(s: &str) -> Option<Subject> {
        let (kind, id) = s.split_once(':')?;
        if id.is_empty() {
            return None;
        }
        match kind {
            "key" => Some(Subject::Key(id.to_string())),
            "user" => Some(Subject::User(id.to_string())),
            "tenant" => Some(Subject::Tenant(id.to_string())),
            _ => None,
        }
    }
}
