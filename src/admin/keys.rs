//! `/admin/keys…` and `/admin/{keys|users|tenants}/{id}/limits`: create, list, show and
//! revoke keys, and replace a subject's limits.
//!
//! Every read and change goes through the [`KeyStore`] the CLI uses too: the
//! embedded database, or Postgres in shared mode (never the local journal there, which
//! other instances do not read). Postgres down → 503 `store_unavailable`, nothing written.
//! A change is followed by a fresh directory snapshot from the store this instance's
//! [`crate::auth::Authenticator`] polls, so the change applies here before the answer is
//! sent; other instances sharing the store see it at their next poll (within 1 s).

use std::collections::HashSet;
use std::str::FromStr;

use hyper::StatusCode;
use serde::Deserialize;

use super::{AdminError, Resp, json};
use crate::auth::Directory;
use crate::engine::Engine;
use crate::keys::{self, KeyRecord, KeyStore, KeyStoreError, NewKey, Subject};
use crate::quota::LimitSpec;

/// Body of `POST /admin/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
    name: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    limits: Vec<String>,
}

/// Body of `PUT /admin/…/{id}/limits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutLimits {
    limits: Vec<String>,
}

impl From<KeyStoreError> for AdminError {
    fn from(e: KeyStoreError) -> AdminError {
        match e {
            KeyStoreError::Unavailable(m) => AdminError::Unavailable(m),
            KeyStoreError::Invalid(m) => AdminError::BadRequest(m),
            KeyStoreError::Store(m) => AdminError::Internal(m),
        }
    }
}

/// Re-read the directory from the store this instance's authenticator polls (the one the
/// change was written to: the embedded database, or Postgres in shared mode) and install
/// it, so the change applies here before the answer is sent. Revisions of one store only:
/// [`crate::auth::Authenticator::replace`] never installs an older one.
async fn refresh(engine: &Engine) {
    let auth = engine.authenticator();
    let Some(source) = auth.source() else {
        return;
    };
    match source.snapshot().await {
        Ok(s) => auth.replace(Directory::from_snapshot(s)),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot reload keys after an admin change; the background refresh will pick it up"
        ),
    }
}

/// Same rule as `keys create` (1-200 bytes, no control characters), checked here to answer 400
/// before anything is written.
fn check_name(what: &str, v: Option<&str>) -> Result<(), AdminError> {
    match v {
        Some(s) if s.is_empty() || s.len() > 200 || s.contains(char::is_control) => Err(
            AdminError::BadRequest(format!("{what} must be 1-200 printable characters")),
        ),
        _ => Ok(()),
    }
}

/// Validate limit specs (400 naming the first bad one and why) and refuse two limits on
/// the same metric, window and scope: a replacement set must say one value for each.
fn check_limits(specs: &[String]) -> Result<Vec<String>, AdminError> {
    let canonical = keys::canonical_limits(specs)?;
    let mut seen = HashSet::new();
    for text in &canonical {
        let mut probe = LimitSpec::from_str(text)
            .map_err(|e| AdminError::BadRequest(format!("invalid limit `{text}`: {e}")))?;
        probe.value = 0;
        if !seen.insert(probe.to_string()) {
            return Err(AdminError::BadRequest(format!(
                "more than one limit for `{}`; give one value per metric, window and scope",
                text.split('=').next().unwrap_or(text)
            )));
        }
    }
    Ok(canonical)
}

/// The key JSON of SPEC §2 with its secret, in the documented field order.
fn created_json(rec: &KeyRecord, secret: &str) -> serde_json::Value {
    serde_json::json!({
        "id": rec.id,
        "key": secret,
        "name": rec.name,
        "user": rec.user,
        "tenant": rec.tenant,
        "plan": rec.plan,
        "limits": rec.limits,
        "status": rec.status,
        "created_at": rec.created_at,
    })
}

pub(super) async fn create(
    engine: &Engine,
    store: &dyn KeyStore,
    body: CreateKey,
) -> Result<Resp, AdminError> {
    check_name("name", Some(&body.name))?;
    check_name("user", body.user.as_deref())?;
    check_name("tenant", body.tenant.as_deref())?;
    if let Some(plan) = &body.plan
        && !engine.config().plans.contains_key(plan)
    {
        return Err(AdminError::BadRequest(format!(
            "plan `{plan}` is not defined in [plans] of the config"
        )));
    }
    let limits = check_limits(&body.limits)?;
    let (rec, secret) = store
        .create(NewKey {
            name: body.name,
            user: body.user,
            tenant: body.tenant,
            plan: body.plan,
            limits,
        })
        .await?;
    refresh(engine).await;
    tracing::info!(key_id = %rec.id, name = %rec.name, user = rec.user.as_deref().unwrap_or(""),
        tenant = rec.tenant.as_deref().unwrap_or(""), "key created through the admin API");
    Ok(json(StatusCode::CREATED, &created_json(&rec, &secret)))
}

pub(super) async fn list(store: &dyn KeyStore) -> Result<Resp, AdminError> {
    let keys = store.list().await?;
    Ok(json(StatusCode::OK, &serde_json::json!({"keys": keys})))
}

fn no_such_key(id: &str) -> AdminError {
    AdminError::NotFound(format!("no key with id `{id}`"))
}

pub(super) async fn show(store: &dyn KeyStore, id: String) -> Result<Resp, AdminError> {
    match store.show(&id).await? {
        Some(rec) => Ok(json(StatusCode::OK, &rec)),
        None => Err(no_such_key(&id)),
    }
}

pub(super) async fn revoke(
    engine: &Engine,
    store: &dyn KeyStore,
    id: String,
) -> Result<Resp, AdminError> {
    let Some(rec) = store.revoke(&id).await? else {
        return Err(no_such_key(&id));
    };
    refresh(engine).await;
    tracing::info!(key_id = %rec.id, "key revoked through the admin API");
    Ok(json(StatusCode::OK, &rec))
}

pub(super) async fn put_limits(
    engine: &Engine,
    store: &dyn KeyStore,
    subject: Subject,
    body: PutLimits,
) -> Result<Resp, AdminError> {
    match &subject {
        Subject::Key(_) => {}
        Subject::User(u) => check_name("user id", Some(u))?,
        Subject::Tenant(t) => check_name("tenant id", Some(t))?,
    }
    let limits = check_limits(&body.limits)?;
    let Some(now) = store.replace_limits(&subject, &limits).await? else {
        let id = match &subject {
            Subject::Key(k) | Subject::User(k) | Subject::Tenant(k) => k.as_str(),
        };
        return Err(no_such_key(id));
    };
    refresh(engine).await;
    let subject_text = subject.as_text();
    tracing::info!(subject = %subject_text, limits = ?now, "limits replaced through the admin API");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"subject": subject_text, "limits": now}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_canonical_and_one_per_counter() {
        assert_eq!(
            check_limits(&["usd:day=5.50".into(), "requests:total=3".into()]).unwrap(),
            vec!["usd:day=5.5", "requests:total=3"]
        );
        let e = check_limits(&["requests:day=5".into(), "requests:day=9".into()]).unwrap_err();
        assert!(
            e.to_string()
                .contains("more than one limit for `requests:day`"),
            "{e}"
        );
        // Different scopes or windows are different limits.
        assert!(check_limits(&["requests:day=5".into(), "requests:day@openai=9".into()]).is_ok());
        let e = check_limits(&["usd:fortnight=1".into()]).unwrap_err();
        assert!(matches!(e, AdminError::BadRequest(_)));
        assert!(e.to_string().contains("usd:fortnight=1"), "{e}");
        assert!(check_limits(&[]).unwrap().is_empty());
    }

    #[test]
    fn names_follow_the_cli_rule() {
        assert!(check_name("user", None).is_ok());
        assert!(check_name("user", Some("alice")).is_ok());
        assert!(check_name("user", Some("")).is_err());
        assert!(check_name("user", Some("a\nb")).is_err());
        assert!(check_name("user", Some(&"x".repeat(201))).is_err());
    }
}
