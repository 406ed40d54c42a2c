//! Certificate plumbing shared by the authority and CSR checks: PEM in and out, X.509 parsing,
//! time conversions and random serial numbers, plus the public parse helpers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use crate::Error;

/// Returns the `notAfter` of the first certificate in `cert_pem`.
pub fn cert_not_after(cert_pem: &str) -> Result<SystemTime, Error> {
    let der = first_cert_der(cert_pem, "certificate")?;
    let cert = parse_cert(&der, "leaf")?;
    asn1_to_system(cert.validity().not_after)
}

/// Returns the URI subject alternative names (the SPIFFE identities) of a DER certificate, in
/// the order the certificate lists them.
pub fn cert_identities(cert_der: &[u8]) -> Result<Vec<String>, Error> {
    let cert = parse_cert(cert_der, "leaf")?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::BadCertificate {
            which: "leaf",
            reason: e.to_string(),
        })?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// The DER of the first `CERTIFICATE` block in `pem`.
pub(crate) fn first_cert_der(pem: &str, what: &'static str) -> Result<Vec<u8>, Error> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.as_ref().to_vec())
        .map_err(|e| Error::BadPem {
            what,
            reason: e.to_string(),
        })
}

/// Parses a DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert<'a>(
    der: &'a [u8],
    which: &'static str,
) -> Result<X509Certificate<'a>, Error> {
    let bad = |reason: String| Error::BadCertificate { which, reason };
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

/// Encodes DER as a PEM block with 64-column lines and a trailing newline.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        // The alphabet is ASCII, so every chunk is valid UTF-8.
        out.extend(line.iter().map(|b| char::from(*b)));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// `t` truncated to whole seconds, as certificates carry it.
pub(crate) fn to_offset(t: SystemTime) -> Result<OffsetDateTime, Error> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_err(|_| Error::TimeOutOfRange)?,
        Err(e) => i64::try_from(e.duration().as_secs())
            .map(|s| -s)
            .map_err(|_| Error::TimeOutOfRange)?,
    };
    OffsetDateTime::from_unix_timestamp(secs).map_err(|_| Error::TimeOutOfRange)
}

/// Converts back from the certificate's whole-second time.
pub(crate) fn from_offset(t: OffsetDateTime) -> Result<SystemTime, Error> {
    unix_to_system(t.unix_timestamp())
}

/// Converts an X.509 validity time.
pub(crate) fn asn1_to_system(t: ASN1Time) -> Result<SystemTime, Error> {
    unix_to_system(t.timestamp())
}

fn unix_to_system(secs: i64) -> Result<SystemTime, Error> {
    let d = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    }
    .ok_or(Error::TimeOutOfRange)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for error messages.
pub(crate) fn fmt_time(t: SystemTime) -> String {
    match to_offset(t) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{t:?}"),
    }
}

/// A random positive 16-byte serial number and its lowercase hex form.
pub(crate) fn random_serial() -> Result<(rcgen::SerialNumber, String), Error> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Random)?;
    // Clear the top bit so the DER INTEGER is positive, and set the next one so it has no
    // leading zero byte to strip: the serial stays exactly 16 bytes and matches `hex`.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok((rcgen::SerialNumber::from_slice(&bytes), hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
            let back = CertificateDer::from_pem_slice(pem.as_bytes());
            match back {
                Ok(back) => assert_eq!(back.as_ref(), der.as_slice(), "len {len}"),
                Err(e) => assert_eq!(len, 0, "len {len}: {e}"),
            }
        }
    }

    #[test]
    fn time_round_trips_at_second_precision() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_750);
        let back = from_offset(to_offset(t).unwrap()).unwrap();
        assert_eq!(back, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert_eq!(fmt_time(back), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn serials_are_positive_and_sixteen_bytes() {
        let (a, hex_a) = random_serial().unwrap();
        let (_, hex_b) = random_serial().unwrap();
        assert_ne!(hex_a, hex_b);
        assert_eq!(a.len(), 16);
        assert_eq!(hex_a.len(), 32);
        assert!(a.to_bytes()[0] & 0x80 == 0 && a.to_bytes()[0] != 0);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            cert_not_after("not pem"),
            Err(Error::BadPem { .. })
        ));
        assert!(matches!(
            cert_identities(b"\x30\x03\x02\x01\x00"),
            Err(Error::BadCertificate { .. })
        ));
    }
}
