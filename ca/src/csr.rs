//! Pure checks of certificate signing requests: parse, self-signature, ECDSA P-256 key, and the
//! requested SANs against the identity the caller is authorised for.
//!
//! Requested extensions other than SANs are ignored rather than refused: the authority never
//! copies anything from a CSR except its public key.

use mesh_api::identity::Identity;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::objects::{oid_registry, oid2sn};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, Oid};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::Error;

/// A CSR that passed [`check`]: its public key may be certified for the expected identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    spki_der: Vec<u8>,
    public_point: Vec<u8>,
    requested_dns: Vec<String>,
    requests_identity: bool,
}

/// Checks a PEM CSR against the identity the caller is authorised for.
///
/// Refuses a CSR that does not parse or whose self-signature does not verify, whose key is not
/// ECDSA P-256 ([`Error::UnsupportedKey`]), or that requests any SAN other than `expected` as a
/// URI or a DNS name in `allowed_dns` ([`Error::CsrIdentityMismatch`]). Requesting no SAN is
/// fine: the issued certificate's names come from the sign request, never from the CSR.
pub fn check(
    csr_pem: &str,
    expected: &Identity,
    allowed_dns: &[String],
) -> Result<CheckedCsr, Error> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
        Error::BadPem {
            what: "certificate signing request",
            reason: e.to_string(),
        }
    })?;
    let bad = |reason: String| Error::BadCsr { reason };
    let (rest, csr) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    // Check the key first: x509-parser cannot verify every algorithm, and an unsupported key
    // deserves its own error rather than a signature failure.
    require_p256(&info.subject_pki)?;
    csr.verify_signature().map_err(|_| Error::CsrSignature)?;

    let expected_uri = expected.to_string();
    let mismatch = |requested: String| Error::CsrIdentityMismatch {
        requested,
        allowed: describe_allowed(&expected_uri, allowed_dns),
    };
    let mut checked = CheckedCsr {
        spki_der: info.subject_pki.raw.to_vec(),
        public_point: info.subject_pki.subject_public_key.data.to_vec(),
        requested_dns: Vec::new(),
        requests_identity: false,
    };
    for attr in info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &req.extensions {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(uri) if *uri == expected_uri => {
                                checked.requests_identity = true;
                            }
                            GeneralName::DNSName(dns) if allowed_dns.iter().any(|a| a == dns) => {
                                checked.requested_dns.push((*dns).to_owned());
                            }
                            other => return Err(mismatch(other.to_string())),
                        }
                    }
                }
                ParsedExtension::ParseError { error } => {
                    return Err(bad(format!("requested extension {}: {error}", ext.oid)));
                }
                _ => {}
            }
        }
    }
    Ok(checked)
}

// === impl CheckedCsr ===

impl CheckedCsr {
    /// The CSR's SubjectPublicKeyInfo (DER): the key the certificate will certify.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The allowed DNS names the CSR asked for (informational; issuance uses the sign request).
    pub fn requested_dns(&self) -> &[String] {
        &self.requested_dns
    }

    /// Whether the CSR named the expected identity as a URI SAN.
    pub fn requests_identity(&self) -> bool {
        self.requests_identity
    }
}

/// Lets rcgen certify the checked key directly.
impl rcgen::PublicKeyData for CheckedCsr {
    fn der_bytes(&self) -> &[u8] {
        &self.public_point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        // `check` accepted only id-ecPublicKey on prime256v1.
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn require_p256(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), Error> {
    let alg = &spki.algorithm;
    if alg.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(Error::UnsupportedKey {
            found: oid_name(&alg.algorithm),
        });
    }
    match alg.parameters.as_ref().map(|p| p.as_oid()) {
        Some(Ok(curve)) if curve == OID_EC_P256 => Ok(()),
        Some(Ok(curve)) => Err(Error::UnsupportedKey {
            found: format!("EC on curve {}", oid_name(&curve)),
        }),
        _ => Err(Error::UnsupportedKey {
            found: "EC without a named curve".to_owned(),
        }),
    }
}

fn oid_name(oid: &Oid<'_>) -> String {
    oid2sn(oid, oid_registry()).map_or_else(|_| oid.to_id_string(), str::to_owned)
}

fn describe_allowed(expected_uri: &str, allowed_dns: &[String]) -> String {
    let mut allowed = format!("URI({expected_uri})");
    for dns in allowed_dns {
        allowed.push_str(&format!(", DNSName({dns})"));
    }
    allowed
}

#[cfg(test)]
mod tests;
