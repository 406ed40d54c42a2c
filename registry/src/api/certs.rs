//! `ListCertificates`: the registry's certificate records, newest first, a page at a time.

use mesh_api::proto::v1 as pb;
use tonic::Status;

use super::{RegistryApi, Rejected, quoted, reject};
use crate::server::PeerInfo;
use crate::store::CertRecord;

/// Most certificate records one `ListCertificates` call returns.
pub const MAX_CERT_PAGE: usize = 1_000;

/// One page of `certs` (newest first): the records after `token` (`issued_unix:serial` of the
/// last record of the previous page), at most `limit` (0: a whole page), and the token of the
/// next page (empty on the last). Pure.
pub fn cert_page(
    certs: &[CertRecord],
    token: &str,
    limit: usize,
) -> Result<(Vec<CertRecord>, String), String> {
    let after = match token {
        "" => None,
        t => {
            let (issued, serial) = t
                .split_once(':')
                .and_then(|(i, s)| Some((i.parse::<i64>().ok()?, s)))
                .ok_or_else(|| {
                    format!("page_token {}: not a token from a previous page", quoted(t))
                })?;
            Some((issued, serial.to_owned()))
        }
    };
    let size = if limit == 0 {
        MAX_CERT_PAGE
    } else {
        limit.min(MAX_CERT_PAGE)
    };
    let rest = certs.iter().filter(|c| match &after {
        None => true,
        // Newest first: later on the page means an older (issued, serial) pair.
        Some((i, s)) => (c.issued_unix, &c.serial) < (*i, s),
    });
    let mut page: Vec<CertRecord> = rest.take(size + 1).cloned().collect();
    let next = if page.len() > size {
        page.truncate(size);
        page.last()
            .map(|c| format!("{}:{}", c.issued_unix, c.serial))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((page, next))
}

impl RegistryApi {
    pub(super) async fn do_list_certificates(
        &self,
        peer: &PeerInfo,
        req: pb::ListCertificatesRequest,
    ) -> Result<pb::ListCertificatesResponse, Rejected> {
        self.require_admin(peer)?;
        let certs = self.blocking(|s| s.list_certs(0)).await?;
        let (page, next) = cert_page(&certs, &req.page_token, req.limit as usize)
            .map_err(|e| reject("bad_request", Status::invalid_argument(e)))?;
        Ok(pb::ListCertificatesResponse {
            certificates: page
                .into_iter()
                .map(|c| pb::CertificateRecord {
                    serial: c.serial,
                    identity: c.identity,
                    node: c.node,
                    not_before_unix: c.not_before_unix,
                    not_after_unix: c.not_after_unix,
                })
                .collect(),
            next_page_token: next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_pages_cover_every_record_once() {
        let certs: Vec<CertRecord> = (0..25)
            .map(|i| CertRecord {
                serial: format!("{:02}", i % 7),
                identity: String::new(),
                node: String::new(),
                issued_unix: 100 - i / 3,
                not_before_unix: 0,
                not_after_unix: 0,
            })
            .collect();
        let mut sorted = certs;
        sorted.sort_by(|a, b| (b.issued_unix, &b.serial).cmp(&(a.issued_unix, &a.serial)));
        sorted.dedup_by(|a, b| (a.issued_unix, &a.serial) == (b.issued_unix, &b.serial));
        let (mut seen, mut token) = (Vec::new(), String::new());
        loop {
            let (page, next) = cert_page(&sorted, &token, 4).unwrap();
            assert!(page.len() <= 4);
            seen.extend(page.into_iter().map(|c| (c.issued_unix, c.serial)));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        let want: Vec<_> = sorted
            .iter()
            .map(|c| (c.issued_unix, c.serial.clone()))
            .collect();
        assert_eq!(seen, want);
        assert!(cert_page(&sorted, "garbage", 4).is_err());
        assert_eq!(
            cert_page(&sorted, "", 0).unwrap().0.len(),
            sorted.len().min(MAX_CERT_PAGE)
        );
    }
}
