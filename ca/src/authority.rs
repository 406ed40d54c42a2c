//! The authority: a root and a signing intermediate (generated, loaded or imported, and
//! validated), issuing leaf certificates whose identity and validity it imposes.

use std::fmt;
use std::time::{Duration, SystemTime};

use mesh_api::identity::{Identity, TrustDomain};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::cert::{self, asn1_to_system, first_cert_der, parse_cert, pem_encode};
use crate::{Error, csr};

/// Backdating of every `notBefore`, to tolerate clock skew between peers.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// PEM material as stored by `mesh-registry init`; the caller reads and writes the files.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The root certificate.
    pub root_cert_pem: String,
    /// The root's PKCS#8 key; `None` when it is kept offline or the CA was imported without it.
    pub root_key_pem: Option<String>,
    /// The signing intermediate's certificate.
    pub intermediate_cert_pem: String,
    /// The signing intermediate's PKCS#8 key.
    pub intermediate_key_pem: String,
}

/// A loaded, validated CA that signs leaf certificates with its intermediate.
pub struct Authority {
    trust_domain: TrustDomain,
    root_der: Vec<u8>,
    root_pem: String,
    intermediate_pem: String,
    root_not_after: SystemTime,
    intermediate_not_before: SystemTime,
    intermediate_not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
    /// Roots peers must trust: the current root, and during a root rotation the other one.
    bundle_pem: String,
}

/// What to issue: the identity and lifetime are imposed, never taken from a CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignRequest {
    /// The identity to certify; the only URI SAN of the leaf.
    pub identity: Identity,
    /// DNS SANs to add (e.g. the registry's host names); a CSR may request only these.
    pub dns_names: Vec<String>,
    /// Requested lifetime from `now`, clamped to the intermediate's `notAfter`.
    pub ttl: Duration,
    /// The current time.
    pub now: SystemTime,
}

/// An issued leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certified identity.
    pub identity: Identity,
    /// The leaf certificate.
    pub leaf_pem: String,
    /// Leaf then intermediate: what a TLS server or client presents.
    pub chain_pem: String,
    /// The serial number, lowercase hex without colons.
    pub serial: String,
    /// The leaf's `notBefore` (whole seconds, backdated for clock skew).
    pub not_before: SystemTime,
    /// The leaf's `notAfter` (whole seconds).
    pub not_after: SystemTime,
}

// === impl CaFiles ===

impl fmt::Debug for CaFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaFiles")
            .field("root_cert_pem", &self.root_cert_pem)
            .field(
                "root_key_pem",
                &self.root_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("intermediate_cert_pem", &self.intermediate_cert_pem)
            .field("intermediate_key_pem", &"<redacted>")
            .finish()
    }
}

// === impl Authority ===

impl Authority {
    /// Creates a new root (10 years, path length 1, "<td> mesh root CA") and a signing
    /// intermediate (1 year within the root's validity, path length 0), both backdated by 60s.
    pub fn generate(
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<(Authority, CaFiles), Error> {
        let not_before = now.checked_sub(CLOCK_SKEW).ok_or(Error::TimeOutOfRange)?;
        let root_not_after = now
            .checked_add(ROOT_LIFETIME)
            .ok_or(Error::TimeOutOfRange)?;
        let intermediate_not_after = now
            .checked_add(INTERMEDIATE_LIFETIME)
            .ok_or(Error::TimeOutOfRange)?
            .min(root_not_after);

        let root_params = ca_params(
            format!("{trust_domain} mesh root CA"),
            1,
            not_before,
            root_not_after,
        )?;
        let root_key = generate_key("generate root key")?;
        let root =
            CertifiedIssuer::self_signed(root_params, root_key).map_err(|source| Error::Rcgen {
                what: "self-sign root certificate",
                source,
            })?;

        let mut int_params = ca_params(
            format!("{trust_domain} mesh intermediate CA"),
            0,
            not_before,
            intermediate_not_after,
        )?;
        int_params.use_authority_key_identifier_extension = true;
        let int_key = generate_key("generate intermediate key")?;
        let int_key_pem = int_key.serialize_pem();
        let intermediate =
            CertifiedIssuer::signed_by(int_params, int_key, &root).map_err(|source| {
                Error::Rcgen {
                    what: "sign intermediate certificate",
                    source,
                }
            })?;

        let files = CaFiles {
            root_cert_pem: root.pem(),
            root_key_pem: Some(root.key().serialize_pem()),
            intermediate_cert_pem: intermediate.pem(),
            intermediate_key_pem: int_key_pem,
        };
        // Loading what we just produced runs every check `load` would run on the files later.
        let authority = Self::load(trust_domain, &files, now)?;
        Ok((authority, files))
    }

    /// Loads material previously produced by [`Authority::generate`] or
    /// [`Authority::import`], checking that both certificates parse and are CAs, that the
    /// root signed the intermediate, that the keys match their certificates, and that the root
    /// and intermediate are valid at `now`. Only the first certificate of each PEM is used.
    pub fn load(
        trust_domain: &TrustDomain,
        files: &CaFiles,
        now: SystemTime,
    ) -> Result<Authority, Error> {
        let root_der = first_cert_der(&files.root_cert_pem, "root certificate")?;
        let int_der = first_cert_der(&files.intermediate_cert_pem, "intermediate certificate")?;
        let root = parse_cert(&root_der, "root")?;
        let int = parse_cert(&int_der, "intermediate")?;

        if !root.is_ca() {
            return Err(Error::NotCa { which: "root" });
        }
        if !int.is_ca() {
            return Err(Error::NotCa {
                which: "intermediate",
            });
        }
        if int.issuer().as_raw() != root.subject().as_raw()
            || int.verify_signature(Some(root.public_key())).is_err()
        {
            return Err(Error::NotSignedByRoot);
        }

        let int_key = load_key(&files.intermediate_key_pem, "intermediate")?;
        require_key_matches(&int_key, &int, "intermediate")?;
        if let Some(root_key_pem) = &files.root_key_pem {
            let root_key = load_key(root_key_pem, "root")?;
            require_key_matches(&root_key, &root, "root")?;
        }

        let root_not_after = asn1_to_system(root.validity().not_after)?;
        if now > root_not_after {
            return Err(Error::RootExpired {
                not_after: root_not_after,
            });
        }
        let intermediate_not_before = asn1_to_system(int.validity().not_before)?;
        let intermediate_not_after = asn1_to_system(int.validity().not_after)?;
        if now < intermediate_not_before {
            return Err(Error::IntermediateNotYetValid {
                not_before: intermediate_not_before,
            });
        }
        if now > intermediate_not_after {
            return Err(Error::IntermediateExpired {
                not_after: intermediate_not_after,
            });
        }

        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(int_der.as_slice()), int_key)
            .map_err(|source| Error::Rcgen {
            what: "load intermediate as issuer",
            source,
        })?;
        let root_der_copy = root_der.clone();
        Ok(Authority {
            trust_domain: trust_domain.clone(),
            root_pem: pem_encode("CERTIFICATE", &root_der),
            intermediate_pem: pem_encode("CERTIFICATE", &int_der),
            root_der,
            root_not_after,
            intermediate_not_before,
            intermediate_not_after,
            issuer,
            bundle_pem: pem_encode("CERTIFICATE", &root_der_copy),
        })
    }

    /// This authority with `bundle_pem` as the roots peers trust: every certificate in it must
    /// be a CA, and the current root must be one of them (else what it signs would not verify).
    pub fn with_trust_bundle(mut self, bundle_pem: &str) -> Result<Authority, Error> {
        let mut normalised = String::new();
        let mut has_root = false;
        for (index, der) in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()).enumerate() {
            let der = der.map_err(|e| Error::BadPem {
                what: "trust bundle",
                reason: e.to_string(),
            })?;
            let cert = parse_cert(der.as_ref(), "trust bundle")?;
            if !cert.is_ca() {
                return Err(Error::BundleNotCa { index });
            }
            has_root |= der.as_ref() == self.root_der.as_slice();
            normalised.push_str(&pem_encode("CERTIFICATE", der.as_ref()));
        }
        if !has_root {
            return Err(Error::BundleWithoutRoot);
        }
        self.bundle_pem = normalised;
        Ok(self)
    }

    /// A new signing intermediate under the root of `files` (which must hold the root key),
    /// valid for a year (within the root's validity) from `now`: the files to store instead.
    pub fn new_intermediate(
        trust_domain: &TrustDomain,
        files: &CaFiles,
        now: SystemTime,
    ) -> Result<CaFiles, Error> {
        let name = format!("{trust_domain} mesh intermediate CA");
        Self::intermediate_named(trust_domain, files, name, now)
    }

    /// The signing intermediate of a new site under the root of `files` (another site's CA
    /// files, with the root key): the new site signs with its own intermediate, so it keeps
    /// issuing when cut off from the others, and is given no copy of the root key.
    pub fn site_intermediate(
        trust_domain: &TrustDomain,
        files: &CaFiles,
        site: &str,
        now: SystemTime,
    ) -> Result<CaFiles, Error> {
        let name = format!("{trust_domain} mesh intermediate CA, site {site}");
        let mut next = Self::intermediate_named(trust_domain, files, name, now)?;
        next.root_key_pem = None;
        Ok(next)
    }

    fn intermediate_named(
        trust_domain: &TrustDomain,
        files: &CaFiles,
        name: String,
        now: SystemTime,
    ) -> Result<CaFiles, Error> {
        let root_key_pem = files.root_key_pem.as_ref().ok_or(Error::RootKeyMissing)?;
        let current = Self::load(trust_domain, files, now)?;
        let root_key = load_key(root_key_pem, "root")?;
        let root =
            Issuer::from_ca_cert_der(&CertificateDer::from(current.root_der.as_slice()), root_key)
                .map_err(|source| Error::Rcgen {
                    what: "load root as issuer",
                    source,
                })?;
        let not_before = now.checked_sub(CLOCK_SKEW).ok_or(Error::TimeOutOfRange)?;
        let not_after = now
            .checked_add(INTERMEDIATE_LIFETIME)
            .ok_or(Error::TimeOutOfRange)?
            .min(current.root_not_after);
        let mut params = ca_params(name, 0, not_before, not_after)?;
        params.use_authority_key_identifier_extension = true;
        let key = generate_key("generate intermediate key")?;
        let cert = params
            .signed_by(&key, &root)
            .map_err(|source| Error::Rcgen {
                what: "sign intermediate certificate",
                source,
            })?;
        let next = CaFiles {
            root_cert_pem: files.root_cert_pem.clone(),
            root_key_pem: files.root_key_pem.clone(),
            intermediate_cert_pem: cert.pem(),
            intermediate_key_pem: key.serialize_pem(),
        };
        // Every check `load` runs, on what we are about to store.
        Self::load(trust_domain, &next, now)?;
        Ok(next)
    }

    /// The intermediate certificate, PEM.
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Imports an operator-provided root certificate, intermediate certificate and intermediate
    /// key, with the same checks as [`Authority::load`]. The returned files hold normalised PEM
    /// (one certificate each, PKCS#8 key) and no root key.
    pub fn import(
        trust_domain: &TrustDomain,
        root_cert_pem: &str,
        intermediate_cert_pem: &str,
        intermediate_key_pem: &str,
        now: SystemTime,
    ) -> Result<(Authority, CaFiles), Error> {
        let given = CaFiles {
            root_cert_pem: root_cert_pem.to_owned(),
            root_key_pem: None,
            intermediate_cert_pem: intermediate_cert_pem.to_owned(),
            intermediate_key_pem: intermediate_key_pem.to_owned(),
        };
        let authority = Self::load(trust_domain, &given, now)?;
        let files = CaFiles {
            root_cert_pem: authority.root_pem.clone(),
            root_key_pem: None,
            intermediate_cert_pem: authority.intermediate_pem.clone(),
            intermediate_key_pem: authority.issuer.key().serialize_pem(),
        };
        Ok((authority, files))
    }

    /// The trust domain whose identities this authority issues.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// PEM of the roots a peer must trust: the root, or the bundle set by
    /// [`Authority::with_trust_bundle`] (old and new root during a rotation).
    pub fn trust_bundle_pem(&self) -> String {
        self.bundle_pem.clone()
    }

    /// DER of the root certificate.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// `sha256:<hex>` of the root certificate's DER.
    pub fn root_fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.root_der);
        mesh_api::token::format_fingerprint(digest.as_ref())
    }

    /// The root's `notAfter`.
    pub fn root_not_after(&self) -> SystemTime {
        self.root_not_after
    }

    /// The intermediate's `notAfter`; no leaf outlives it.
    pub fn intermediate_not_after(&self) -> SystemTime {
        self.intermediate_not_after
    }

    /// Signs a PEM CSR for `req.identity` after [`csr::check`] against it and `req.dns_names`.
    /// Only the CSR's public key is used: names, usages and validity come from `req`.
    pub fn sign_csr(&self, csr_pem: &str, req: &SignRequest) -> Result<Issued, Error> {
        self.require_own_trust_domain(&req.identity)?;
        let checked = csr::check(csr_pem, &req.identity, &req.dns_names)?;
        self.sign(&checked, req)
    }

    /// Like [`Authority::sign_csr`], but generates an ECDSA P-256 key here and returns it as
    /// PKCS#8 PEM (for the registry's serving certificate and operator credentials).
    pub fn issue(&self, req: &SignRequest) -> Result<(Issued, String), Error> {
        self.require_own_trust_domain(&req.identity)?;
        let key = generate_key("generate leaf key")?;
        let issued = self.sign(&key, req)?;
        Ok((issued, key.serialize_pem()))
    }

    fn require_own_trust_domain(&self, identity: &Identity) -> Result<(), Error> {
        if identity.trust_domain() == &self.trust_domain {
            Ok(())
        } else {
            Err(Error::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            })
        }
    }

    fn sign(&self, public_key: &impl PublicKeyData, req: &SignRequest) -> Result<Issued, Error> {
        if req.ttl.is_zero() {
            return Err(Error::ZeroTtl);
        }
        if req.now >= self.intermediate_not_after {
            return Err(Error::IntermediateExpired {
                not_after: self.intermediate_not_after,
            });
        }
        let not_before = req
            .now
            .checked_sub(CLOCK_SKEW)
            .ok_or(Error::TimeOutOfRange)?
            .max(self.intermediate_not_before);
        let not_after = req
            .now
            .checked_add(req.ttl)
            .map_or(self.intermediate_not_after, |t| {
                t.min(self.intermediate_not_after)
            });
        // Signing "as of" a time before the intermediate existed would produce a certificate
        // that ends before it starts; refuse instead of issuing something meaningless.
        if not_after <= not_before {
            return Err(Error::IntermediateNotYetValid {
                not_before: self.intermediate_not_before,
            });
        }
        let identity = req.identity.to_string();

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.as_str());
        let uri = Ia5String::try_from(identity.as_str())
            .expect("identity URIs are ASCII: mesh-api validates every label");
        params.subject_alt_names = vec![SanType::URI(uri)];
        for name in &req.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns_san(name)?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let (serial_number, serial) = cert::random_serial()?;
        params.serial_number = Some(serial_number);
        params.not_before = cert::to_offset(not_before)?;
        params.not_after = cert::to_offset(not_after)?;

        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(|source| Error::Rcgen {
                what: "sign leaf certificate",
                source,
            })?;
        let leaf_pem = pem_encode("CERTIFICATE", leaf.der());
        Ok(Issued {
            identity: req.identity.clone(),
            chain_pem: format!("{leaf_pem}{}", self.intermediate_pem),
            leaf_pem,
            serial,
            not_before: cert::from_offset(params.not_before)?,
            not_after: cert::from_offset(params.not_after)?,
        })
    }
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("root_fingerprint", &self.root_fingerprint())
            .field("root_not_after", &self.root_not_after)
            .field("intermediate_not_after", &self.intermediate_not_after)
            .finish_non_exhaustive()
    }
}

fn ca_params(
    common_name: String,
    path_len: u8,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(cert::random_serial()?.0);
    params.not_before = cert::to_offset(not_before)?;
    params.not_after = cert::to_offset(not_after)?;
    Ok(params)
}

fn generate_key(what: &'static str) -> Result<KeyPair, Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| Error::Rcgen { what, source })
}

fn load_key(pem: &str, which: &'static str) -> Result<KeyPair, Error> {
    KeyPair::from_pem(pem).map_err(|source| Error::BadKey { which, source })
}

fn require_key_matches(
    key: &KeyPair,
    cert: &x509_parser::certificate::X509Certificate<'_>,
    which: &'static str,
) -> Result<(), Error> {
    if key.public_key_raw() == cert.public_key().subject_public_key.data.as_ref() {
        Ok(())
    } else {
        Err(Error::KeyMismatch { which })
    }
}

fn dns_san(name: &str) -> Result<Ia5String, Error> {
    let bad = || Error::BadDnsName {
        name: name.to_owned(),
    };
    rustls_pki_types::DnsName::try_from(name).map_err(|_| bad())?;
    Ia5String::try_from(name).map_err(|_| bad())
}

#[cfg(test)]
mod tests;
