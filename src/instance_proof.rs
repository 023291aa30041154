//! How the CLI knows it talks to the real instance before it sends the admin token.
//!
//! `tollgate usage`, `report`, `journal status` and `reconcile` ask the running instance
//! at `server.admin_listen` first. Whoever listens on that port would receive the admin
//! token — a local user who bound it while tollgate was down, say — and could feed the
//! CLI false answers. So:
//!
//! - `serve`, once its admin listener is bound, writes a fresh random secret to
//!   `<journal_path>.instance-secret`, mode 0600 (readable by the service user only, like
//!   the journal itself);
//! - `GET /healthz?challenge=<hex>` (open, no token) answers with
//!   `proof = HMAC-SHA256(secret, "tollgate-admin-proof|<admin_listen>|<challenge>")`;
//! - the CLI reads the secret file, sends a fresh random challenge, and sends the token
//!   only when the proof matches. Otherwise (no file, unreadable file, wrong proof) it
//!   sends nothing and reads the storage itself.
//!
//! The proof names the instance's own `admin_listen`, so an instance on another address
//! (a relay's target) does not vouch for this one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Longest challenge accepted (hex characters).
pub const MAX_CHALLENGE: usize = 128;

static SECRET: OnceLock<Vec<u8>> = OnceLock::new();

/// The file holding the running instance's secret, next to its journal.
pub fn secret_path(journal_path: &Path) -> PathBuf {
    let mut name = journal_path.as_os_str().to_owned();
    name.push(".instance-secret");
    PathBuf::from(name)
}

/// Make this process's secret and write it (hex) to [`secret_path`] with mode 0600,
/// replacing a previous run's. The secret is kept for [`proof`].
pub fn publish(journal_path: &Path) -> std::io::Result<()> {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let secret = SECRET.get_or_init(|| bytes.to_vec());
    let path = secret_path(journal_path);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(hex::encode(secret).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// The proof of this process for `challenge`, once [`publish`] ran; `None` before, or for
/// a challenge that is not 1 to [`MAX_CHALLENGE`] hex digits.
pub fn proof(admin_listen: &str, challenge: &str) -> Option<String> {
    let secret = SECRET.get()?;
    valid_challenge(challenge).then(|| prove(secret, admin_listen, challenge))
}

fn valid_challenge(c: &str) -> bool {
    !c.is_empty() && c.len() <= MAX_CHALLENGE && c.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The proof for `challenge` of the instance on `admin_listen` holding `secret`, hex.
pub fn prove(secret: &[u8], admin_listen: &str, challenge: &str) -> String {
    let msg = format!("tollgate-admin-proof|{admin_listen}|{challenge}");
    hex::encode(hmac_sha256(secret, msg.as_bytes()))
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(secret: &[u8], msg: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 64;
    let mut key = [0u8; BLOCK];
    if secret.len() > BLOCK {
        key[..32].copy_from_slice(&Sha256::digest(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let pad = |b: u8| key.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

/// A fresh random challenge for the CLI.
pub fn challenge() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    hex::encode(bytes)
}

/// The secret the running instance published next to `journal_path`, if this user can
/// read it.
pub fn read_secret(journal_path: &Path) -> Option<Vec<u8>> {
    let text = std::fs::read_to_string(secret_path(journal_path)).ok()?;
    hex::decode(text.trim()).ok().filter(|s| !s.is_empty())
}

/// Whether `presented` is the proof of `secret` for `challenge`, in constant time.
pub fn verify(secret: &[u8], admin_listen: &str, challenge: &str, presented: &str) -> bool {
    let expected = prove(secret, admin_listen, challenge);
    expected.len() == presented.len() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2: a short key.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_proof_is_bound_to_secret_address_and_challenge() {
        let p = prove(b"secret", "127.0.0.1:9091", "ab12");
        assert!(verify(b"secret", "127.0.0.1:9091", "ab12", &p));
        assert!(!verify(b"other", "127.0.0.1:9091", "ab12", &p));
        assert!(!verify(b"secret", "127.0.0.1:9092", "ab12", &p));
        assert!(!verify(b"secret", "127.0.0.1:9091", "ab13", &p));
        assert!(!verify(b"secret", "127.0.0.1:9091", "ab12", ""));
        assert!(!valid_challenge(""));
        assert!(!valid_challenge("xyz"));
        assert!(!valid_challenge(&"a".repeat(MAX_CHALLENGE + 1)));
    }
}
