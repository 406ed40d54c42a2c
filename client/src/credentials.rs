//! Operator credentials (`admin.pem`, `admin-key.pem`, `ca.pem`, optional `meshctl.toml`, as
//! `mesh-registry init` writes them): the registry client they authenticate, and the trust
//! bundle they keep current across a root rotation.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use mesh_api::TrustDomain;
use mesh_runtime::tls::{self, CertSlot};

use crate::DEFAULT_TIMEOUT;
use crate::registry::{self as control, Auth};

/// Where `meshctl` looks for operator credentials by default.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/etc/mesh/admin";

/// Operator credentials: `admin.pem`, `admin-key.pem`, `ca.pem`, optional `meshctl.toml`.
pub struct Credentials {
    dir: PathBuf,
    registry: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    registry: Option<String>,
}

impl Credentials {
    /// Reads `dir/meshctl.toml` if present.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let file = dir.join("meshctl.toml");
        let registry = match std::fs::read_to_string(&file) {
            Ok(text) => {
                toml::from_str::<CredentialsFile>(&text)
                    .with_context(|| format!("{}", file.display()))?
                    .registry
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        Ok(Self {
            dir: dir.to_owned(),
            registry,
        })
    }

    /// The registry address: `registry` (from `--registry`) or the one in `meshctl.toml`.
    pub fn registry_address(&self, registry: Option<&str>) -> anyhow::Result<String> {
        registry
            .map(str::to_owned)
            .or_else(|| self.registry.clone())
            .context("no registry address: pass --registry or put registry = \"host:port\" in meshctl.toml")
    }

    /// The trust domain of the operator certificate.
    pub fn trust_domain(&self) -> anyhow::Result<TrustDomain> {
        let p = self.dir.join("admin.pem");
        let chain = std::fs::read_to_string(&p)
            .with_context(|| format!("reading operator credential {}", p.display()))?;
        let certs = tls::parse_certs(&chain, "operator certificate")?;
        tls::peer_identity(&certs)
            .map(|id| id.trust_domain().clone())
            .context("operator certificate carries no mesh identity")
    }

    /// Replaces `ca.pem` with the registry's current trust bundle when it differs (a root
    /// rotation), so these credentials keep reaching the registry after it switches roots.
    /// The bundle arrives over a connection verified against the old one. Returns whether the
    /// file changed.
    pub async fn refresh_bundle(&self, client: &control::Client) -> anyhow::Result<bool> {
        let bundle = client.trust_bundle().await?.trust_bundle_pem;
        let path = self.dir.join("ca.pem");
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if bundle.is_empty() || bundle == current {
            return Ok(false);
        }
        tls::root_store(&bundle).context("the registry's trust bundle does not parse")?;
        let tmp = self.dir.join("ca.pem.tmp");
        std::fs::write(&tmp, &bundle).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        Ok(true)
    }

    /// A registry client authenticated as the operator; `registry` overrides the address.
    pub fn client(&self, registry: Option<&str>) -> anyhow::Result<control::Client> {
        let addr = self.registry_address(registry)?;
        let read = |name: &str| {
            let p = self.dir.join(name);
            std::fs::read_to_string(&p)
                .with_context(|| format!("reading operator credential {}", p.display()))
        };
        let chain = read("admin.pem")?;
        let key = read("admin-key.pem")?;
        let bundle = read("ca.pem")?;
        let certs = tls::parse_certs(&chain, "operator certificate")?;
        let trust_domain: TrustDomain = tls::peer_identity(&certs)
            .map(|id| id.trust_domain().clone())
            .context("operator certificate carries no mesh identity")?;
        Ok(control::Client::new(
            &addr,
            Auth::Mesh {
                roots: tls::RootsSlot::new(tls::root_store(&bundle)?),
                trust_domain,
                cert: CertSlot::new(Some(tls::certified_key(&chain, &key)?)),
            },
            DEFAULT_TIMEOUT,
            DEFAULT_TIMEOUT,
        )?)
    }
}
