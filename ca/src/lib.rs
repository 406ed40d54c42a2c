//! The mesh certificate authority: creates or imports a root and signing intermediate, checks
//! CSRs against the identity a caller is authorised for, and issues SPIFFE leaf certificates.
//! No clocks and no files: callers pass `now` and move PEM strings in and out.

#![warn(missing_docs)]

use std::time::SystemTime;

use mesh_api::identity::{Identity, TrustDomain};

mod authority;
mod cert;
pub mod csr;

pub use authority::{Authority, CaFiles, Issued, SignRequest};
pub use cert::{cert_identities, cert_not_after};

/// Why the CA refused to load material, check a CSR or issue a certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text holds no PEM block of the expected kind.
    #[error("{what} is not valid PEM: {reason}")]
    BadPem {
        /// What was being read, e.g. "root certificate".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate's DER does not parse.
    #[error("cannot parse {which} certificate: {reason}")]
    BadCertificate {
        /// Which certificate: "root", "intermediate" or "leaf".
        which: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// A private key does not load (ECDSA/Ed25519/RSA in PKCS#8 PEM is expected).
    #[error("cannot load {which} private key, expected a PKCS#8 PEM key")]
    BadKey {
        /// Which key: "root" or "intermediate".
        which: &'static str,
        /// The loader's error.
        #[source]
        source: rcgen::Error,
    },
    /// A CA certificate lacks `basicConstraints CA:TRUE`.
    #[error("{which} certificate is not a CA certificate")]
    NotCa {
        /// Which certificate: "root" or "intermediate".
        which: &'static str,
    },
    /// A trust bundle does not hold the CA's current root.
    #[error("trust bundle does not contain the current root certificate")]
    BundleWithoutRoot,
    /// A trust bundle holds something other than CA certificates.
    #[error("trust bundle certificate {index} is not a CA certificate")]
    BundleNotCa {
        /// Position in the bundle, from 0.
        index: usize,
    },
    /// Rotating the intermediate needs the root's key, which this CA does not hold.
    #[error(
        "the root key is not in the CA directory (kept offline, or the CA was imported): \
         sign a new intermediate with it elsewhere and import it"
    )]
    RootKeyMissing,
    /// The intermediate's issuer name or signature does not match the root.
    #[error("intermediate certificate is not signed by the root certificate")]
    NotSignedByRoot,
    /// A private key belongs to a different certificate.
    #[error("{which} private key does not match the {which} certificate's public key")]
    KeyMismatch {
        /// Which pair: "root" or "intermediate".
        which: &'static str,
    },
    /// The root certificate is past its `notAfter`.
    #[error("root certificate expired at {}", cert::fmt_time(*.not_after))]
    RootExpired {
        /// The root's `notAfter`.
        not_after: SystemTime,
    },
    /// The intermediate is past its `notAfter`; rotate the intermediate.
    #[error("intermediate certificate expired at {}, rotate it", cert::fmt_time(*.not_after))]
    IntermediateExpired {
        /// The intermediate's `notAfter`.
        not_after: SystemTime,
    },
    /// The intermediate's `notBefore` is in the future, maybe the clock is wrong.
    #[error(
        "intermediate certificate is not valid before {}, maybe the clock is wrong",
        cert::fmt_time(*.not_before)
    )]
    IntermediateNotYetValid {
        /// The intermediate's `notBefore`.
        not_before: SystemTime,
    },
    /// The CSR does not parse.
    #[error("cannot parse certificate signing request: {reason}")]
    BadCsr {
        /// The parser's complaint.
        reason: String,
    },
    /// The CSR's self-signature does not verify against its own public key.
    #[error("certificate signing request signature does not verify")]
    CsrSignature,
    /// The CSR's key is not ECDSA P-256.
    #[error("certificate signing request key is {found}, only ECDSA P-256 is accepted")]
    UnsupportedKey {
        /// The key algorithm or curve found.
        found: String,
    },
    /// The CSR asks for a subject alternative name the caller may not have.
    #[error("certificate signing request asks for {requested} but only {allowed} may be issued")]
    CsrIdentityMismatch {
        /// The offending requested SAN.
        requested: String,
        /// The SANs the caller is authorised for.
        allowed: String,
    },
    /// The identity belongs to another trust domain than this authority's.
    #[error("identity {identity} is outside this authority's trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The requested identity.
        identity: Identity,
        /// The authority's trust domain.
        trust_domain: TrustDomain,
    },
    /// A DNS name cannot be put in a certificate.
    #[error("dns name {name:?} is not valid in a certificate")]
    BadDnsName {
        /// The rejected name.
        name: String,
    },
    /// A zero certificate lifetime was requested.
    #[error("certificate ttl must be positive")]
    ZeroTtl,
    /// A time cannot be written into a certificate.
    #[error("time is outside the range a certificate can carry")]
    TimeOutOfRange,
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// Key generation or certificate signing failed inside rcgen.
    #[error("failed to {what}")]
    Rcgen {
        /// The step that failed, e.g. "sign leaf certificate".
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}
