//! TLS to the broker (`amqps://`): the CA and client-certificate files read into lapin's TLS
//! settings and checked once at start-up ([`TlsFiles::load`]), and what a failed TLS handshake
//! means, as plain data ([`TlsFailure`]), so that a certificate problem stops the service with a
//! message naming the cause and the setting instead of being retried for ever.
//!
//! The TLS stack is native-tls (system OpenSSL on Linux): the server is verified against the
//! system's CA store (OpenSSL's default paths) plus, when `AMQP_CA_FILE` is set, the CAs in that
//! file. The files are checked with the same library the connection uses, so a file accepted here
//! is one the handshake can use.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use std::path::{Path, PathBuf};

/// The setting naming the PEM file of CA certificates to trust.
pub const CA_FILE: &str = "AMQP_CA_FILE";
/// The setting naming the client certificate (PEM, optionally followed by its chain).
pub const CLIENT_CERT_FILE: &str = "AMQP_CLIENT_CERT_FILE";
/// The setting naming the client certificate's private key (unencrypted PKCS#8 PEM).
pub const CLIENT_KEY_FILE: &str = "AMQP_CLIENT_KEY_FILE";

/// Where the TLS files are, as configured (each one optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `AMQP_CA_FILE`: CA certificates (PEM) trusted besides the system's store.
    pub ca_file: Option<PathBuf>,
    /// `AMQP_CLIENT_CERT_FILE`: the client certificate (PEM), for brokers that ask for one.
    pub client_cert_file: Option<PathBuf>,
    /// `AMQP_CLIENT_KEY_FILE`: the client certificate's key (unencrypted PKCS#8 PEM).
    pub client_key_file: Option<PathBuf>,
}

/// A TLS file that cannot be used. Each variant names the setting and the file, never a password.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The file cannot be read (missing, no permission, a directory).
    #[error("cannot read {setting} ({}): {source}", path.display())]
    Unreadable {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no `-----BEGIN CERTIFICATE-----` block.
    #[error(
        "{setting} ({}) holds no PEM certificate (a -----BEGIN CERTIFICATE----- block); \
         a DER file converts with `openssl x509 -inform der -in <file> -out <file>.pem`",
        path.display()
    )]
    NoCertificate {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A certificate block of the file does not parse.
    #[error("{setting} ({}) holds a certificate that does not parse: {reason}", path.display())]
    BadCertificate {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// The TLS library's words.
        reason: String,
    },
    /// The key is not an unencrypted PKCS#8 PEM key, the one form native-tls takes.
    #[error(
        "AMQP_CLIENT_KEY_FILE ({}) is not an unencrypted PKCS#8 PEM key (-----BEGIN PRIVATE KEY-----); \
         convert it with `openssl pkcs8 -topk8 -nocrypt -in <key> -out <key>.pk8`",
        path.display()
    )]
    NotPkcs8 {
        /// The key file.
        path: PathBuf,
    },
    /// The key does not parse, or does not belong to the certificate.
    #[error(
        "the client certificate (AMQP_CLIENT_CERT_FILE {}) and key (AMQP_CLIENT_KEY_FILE {}) \
         cannot be used together: {reason}",
        cert.display(),
        key.display()
    )]
    BadIdentity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The TLS library's words.
        reason: String,
    },
    /// Only one of the certificate and the key is set.
    #[error("{set} is set but {missing} is not: a client certificate needs both")]
    HalfIdentity {
        /// The setting that is set.
        set: &'static str,
        /// The setting that is missing.
        missing: &'static str,
    },
}

impl TlsFiles {
    /// Whether any TLS file is configured.
    pub fn any(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }

    /// Reads and checks the files into lapin's TLS settings. With no file set this is lapin's
    /// default: the system's CA store, no client certificate.
    pub fn load(&self) -> Result<OwnedTLSConfig, TlsSetupError> {
        let mut config = OwnedTLSConfig::default();
        let mut builder = native_tls::TlsConnector::builder();
        if let Some(path) = &self.ca_file {
            let pem = read_text(CA_FILE, path)?;
            for cert in certificates(CA_FILE, path, &pem)? {
                builder.add_root_certificate(cert);
            }
            config.cert_chain = Some(pem);
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(TlsSetupError::HalfIdentity {
                    set: CLIENT_CERT_FILE,
                    missing: CLIENT_KEY_FILE,
                });
            }
            (None, Some(_)) => {
                return Err(TlsSetupError::HalfIdentity {
                    set: CLIENT_KEY_FILE,
                    missing: CLIENT_CERT_FILE,
                });
            }
            (Some(cert_path), Some(key_path)) => {
                let pem = read_text(CLIENT_CERT_FILE, cert_path)?;
                certificates(CLIENT_CERT_FILE, cert_path, &pem)?;
                let key = read_text(CLIENT_KEY_FILE, key_path)?;
                // native-tls wants the key block first; leading blank lines or comments are fine.
                let key = key[key.find("-----BEGIN").unwrap_or(0)..].to_owned();
                if !key.starts_with("-----BEGIN PRIVATE KEY-----") {
                    return Err(TlsSetupError::NotPkcs8 {
                        path: key_path.clone(),
                    });
                }
                let bad_identity = |reason: String| TlsSetupError::BadIdentity {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    reason,
                };
                let identity = native_tls::Identity::from_pkcs8(pem.as_bytes(), key.as_bytes())
                    .map_err(|err| bad_identity(err.to_string()))?;
                builder.identity(identity);
                config.identity = Some(OwnedIdentity::PKCS8 {
                    pem: pem.into_bytes(),
                    key: key.into_bytes(),
                });
            }
        }
        // Building the connector loads the key next to its certificate, which checks they match.
        builder.build().map_err(
            |err| match (&self.client_cert_file, &self.client_key_file) {
                (Some(cert), Some(key)) => TlsSetupError::BadIdentity {
                    cert: cert.clone(),
                    key: key.clone(),
                    reason: err.to_string(),
                },
                _ => TlsSetupError::BadCertificate {
                    setting: CA_FILE,
                    path: self.ca_file.clone().unwrap_or_default(),
                    reason: err.to_string(),
                },
            },
        )?;
        Ok(config)
    }
}

fn read_text(setting: &'static str, path: &Path) -> Result<String, TlsSetupError> {
    let bytes = std::fs::read(path).map_err(|source| TlsSetupError::Unreadable {
        setting,
        path: path.to_owned(),
        source,
    })?;
    // PEM is ASCII; a binary (DER) file is reported as holding no PEM certificate.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The certificates of a PEM text, at least one, each parsed.
fn certificates(
    setting: &'static str,
    path: &Path,
    pem: &str,
) -> Result<Vec<native_tls::Certificate>, TlsSetupError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut certs = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let block = &rest[start..];
        let Some(end) = block.find(END) else {
            return Err(TlsSetupError::BadCertificate {
                setting,
                path: path.to_owned(),
                reason: format!("a certificate block has no {END} line"),
            });
        };
        let block = &block[..end + END.len()];
        let cert = native_tls::Certificate::from_pem(block.as_bytes()).map_err(|err| {
            TlsSetupError::BadCertificate {
                setting,
                path: path.to_owned(),
                reason: err.to_string(),
            }
        })?;
        certs.push(cert);
        rest = &rest[start + block.len()..];
    }
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            setting,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Why a TLS handshake with the broker failed, when it is something no retry fixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The broker's certificate does not chain to a CA we trust (wrong or missing `AMQP_CA_FILE`).
    UntrustedCertificate,
    /// The broker's certificate (or one of its chain) has expired.
    Expired,
    /// The broker's certificate is not valid yet (a wrong clock here or there).
    NotYetValid,
    /// The broker's certificate does not name the host of `AMQP_URL`.
    HostMismatch,
    /// The port answered, but not with TLS: a plain AMQP port given an `amqps://` URL.
    NotTls,
    /// The broker refused our client certificate, or wanted one and got none.
    ClientCertificateRefused,
    /// The broker ended the handshake without saying why (TLS 1.2 `handshake_failure`): no
    /// client certificate where one is required, or no TLS version or cipher in common.
    HandshakeRefused,
}

/// OpenSSL's words for each failure (its verify results and reason strings), lower case.
const PATTERNS: &[(&str, TlsFailure)] = &[
    ("certificate has expired", TlsFailure::Expired),
    ("certificate is not yet valid", TlsFailure::NotYetValid),
    ("hostname mismatch", TlsFailure::HostMismatch),
    ("ip address mismatch", TlsFailure::HostMismatch),
    (
        "unable to get local issuer certificate",
        TlsFailure::UntrustedCertificate,
    ),
    (
        "unable to get issuer certificate",
        TlsFailure::UntrustedCertificate,
    ),
    ("self-signed certificate", TlsFailure::UntrustedCertificate),
    ("self signed certificate", TlsFailure::UntrustedCertificate),
    (
        "unable to verify the first certificate",
        TlsFailure::UntrustedCertificate,
    ),
    (
        "certificate verify failed",
        TlsFailure::UntrustedCertificate,
    ),
    // What OpenSSL says when the first bytes back are not a TLS record: RabbitMQ's plain port
    // answers a ClientHello with its `AMQP 0 0 9 1` protocol header.
    ("wrong version number", TlsFailure::NotTls),
    ("packet length too long", TlsFailure::NotTls),
    ("record layer failure", TlsFailure::NotTls),
    ("http request", TlsFailure::NotTls),
    // Alerts the broker sends about our certificate.
    (
        "alert certificate required",
        TlsFailure::ClientCertificateRefused,
    ),
    (
        "alert bad certificate",
        TlsFailure::ClientCertificateRefused,
    ),
    ("alert unknown ca", TlsFailure::ClientCertificateRefused),
    (
        "alert certificate expired",
        TlsFailure::ClientCertificateRefused,
    ),
    (
        "alert certificate unknown",
        TlsFailure::ClientCertificateRefused,
    ),
    ("alert handshake failure", TlsFailure::HandshakeRefused),
];

impl TlsFailure {
    /// The failure an error text describes, if it is one of these. A closed connection, a reset,
    /// a timeout or an unexpected EOF (a broker restarting mid-handshake) is none of them: those
    /// are retried.
    pub fn recognise(text: &str) -> Option<Self> {
        let text = text.to_ascii_lowercase();
        // The first listed pattern found wins: the specific verify results come before OpenSSL's
        // generic "certificate verify failed" that accompanies them.
        PATTERNS
            .iter()
            .find(|(pattern, _)| text.contains(pattern))
            .map(|(_, failure)| *failure)
    }

    /// What to tell the operator: the cause, and the setting that fixes it. `host` is the broker
    /// host of the URL that failed (never the URL, which may carry a password); `detail` is the
    /// TLS library's text, of which the message quotes OpenSSL's reason (the full text stays in
    /// the error's cause).
    pub fn message(self, host: &str, port: u16, files: &TlsFiles, detail: &str) -> String {
        let detail = reason(detail);
        let trusted = match &files.ca_file {
            Some(path) => format!(
                "the system's CA store and the CAs in {CA_FILE} ({})",
                path.display()
            ),
            None => format!("the system's CA store ({CA_FILE} is not set)"),
        };
        match self {
            Self::UntrustedCertificate => format!(
                "TLS: the certificate of the broker at {host}:{port} is not signed by a CA we trust \
                 (checked against {trusted}): set {CA_FILE} to the PEM file of the CA that signed \
                 the broker's certificate ({detail})"
            ),
            Self::Expired => format!(
                "TLS: the certificate of the broker at {host}:{port} has expired: the broker needs \
                 a renewed certificate (checked against {trusted}; {detail})"
            ),
            Self::NotYetValid => format!(
                "TLS: the certificate of the broker at {host}:{port} is not valid yet: check the \
                 clocks of this machine and the broker ({detail})"
            ),
            Self::HostMismatch => format!(
                "TLS: the broker's certificate is not valid for `{host}`, the host in AMQP_URL: \
                 connect with a name the certificate lists, or give the broker a certificate for \
                 this name ({detail})"
            ),
            Self::NotTls => format!(
                "TLS: {host}:{port} does not speak TLS (it answered the TLS handshake with \
                 something else, as a plain AMQP port such as 5672 does): use the broker's TLS \
                 port (usually 5671) in the amqps:// URL of AMQP_URL, or amqp:// for a plain port \
                 ({detail})"
            ),
            Self::ClientCertificateRefused => match &files.client_cert_file {
                Some(path) => format!(
                    "TLS: the broker at {host}:{port} refused our client certificate \
                     ({CLIENT_CERT_FILE} {}): it must be signed by a CA the broker trusts and \
                     valid ({detail})",
                    path.display()
                ),
                None => format!(
                    "TLS: the broker at {host}:{port} asks for a client certificate: set \
                     {CLIENT_CERT_FILE} and {CLIENT_KEY_FILE} ({detail})"
                ),
            },
            Self::HandshakeRefused => format!(
                "TLS: the broker at {host}:{port} refused the TLS handshake: it may require a \
                 client certificate ({CLIENT_CERT_FILE}, {CLIENT_KEY_FILE}), or it has no TLS \
                 version or cipher in common with this client ({detail})"
            ),
        }
    }
}

/// OpenSSL's reason in an error text: the verify result in the closing parentheses
/// (`... certificate verify failed:...: (certificate has expired)`), else the reason field of
/// `error:<code>:SSL routines:<function>:<reason>:<file>:<line>:`, else the whole text.
fn reason(text: &str) -> &str {
    let text = text.trim();
    if let Some(inner) = text.strip_suffix(')')
        && let Some(open) = inner.rfind('(')
    {
        return &inner[open + 1..];
    }
    for (start, _) in text.match_indices("error:") {
        let fields: Vec<&str> = text[start..].split(':').collect();
        let is_code = fields
            .get(1)
            .is_some_and(|code| !code.is_empty() && code.chars().all(|c| c.is_ascii_hexdigit()));
        if is_code && let Some(reason) = fields.get(4).filter(|r| !r.is_empty()) {
            return reason;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/tls")
            .join(name)
    }

    fn files(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> TlsFiles {
        TlsFiles {
            ca_file: ca.map(testdata),
            client_cert_file: cert.map(testdata),
            client_key_file: key.map(testdata),
        }
    }

    #[test]
    fn no_files_is_the_system_store() {
        let config = TlsFiles::default().load().unwrap();
        assert_eq!(config, OwnedTLSConfig::default());
    }

    #[test]
    fn a_ca_and_a_client_certificate_load() {
        let config = files(Some("ca.pem"), Some("client.pem"), Some("client.key"))
            .load()
            .unwrap();
        assert!(config.cert_chain.unwrap().contains("BEGIN CERTIFICATE"));
        assert!(matches!(config.identity, Some(OwnedIdentity::PKCS8 { .. })));
    }

    #[test]
    fn a_missing_ca_file_names_the_setting_and_the_path() {
        let err = files(Some("nope.pem"), None, None).load().unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TlsSetupError::Unreadable { .. }), "{text}");
        assert!(text.contains("AMQP_CA_FILE"), "{text}");
        assert!(text.contains("nope.pem"), "{text}");
    }

    #[test]
    fn a_key_given_as_the_ca_file_is_no_certificate() {
        let err = files(Some("client.key"), None, None).load().unwrap_err();
        assert!(
            matches!(
                err,
                TlsSetupError::NoCertificate {
                    setting: CA_FILE,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_broken_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = TlsFiles {
            ca_file: Some(path),
            ..TlsFiles::default()
        }
        .load()
        .unwrap_err();
        assert!(matches!(err, TlsSetupError::BadCertificate { .. }), "{err}");
    }

    #[test]
    fn half_a_client_identity_is_refused() {
        let err = files(None, Some("client.pem"), None).load().unwrap_err();
        assert_eq!(
            err.to_string(),
            "AMQP_CLIENT_CERT_FILE is set but AMQP_CLIENT_KEY_FILE is not: a client certificate needs both"
        );
        let err = files(None, None, Some("client.key")).load().unwrap_err();
        assert!(matches!(err, TlsSetupError::HalfIdentity { .. }), "{err}");
    }

    #[test]
    fn a_traditional_key_is_refused_with_the_conversion() {
        let err = files(None, Some("client.pem"), Some("traditional.key"))
            .load()
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TlsSetupError::NotPkcs8 { .. }), "{text}");
        assert!(text.contains("openssl pkcs8 -topk8 -nocrypt"), "{text}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let err = files(None, Some("client.pem"), Some("other.key"))
            .load()
            .unwrap_err();
        assert!(matches!(err, TlsSetupError::BadIdentity { .. }), "{err}");
    }

    /// Texts as native-tls (OpenSSL 3) reports them through lapin.
    #[test]
    fn openssl_texts_are_recognised() {
        let cases = [
            (
                "IO error: error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: (unable to get local issuer certificate)",
                TlsFailure::UntrustedCertificate,
            ),
            (
                "IO error: error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: (certificate has expired)",
                TlsFailure::Expired,
            ),
            (
                "IO error: error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: (Hostname mismatch)",
                TlsFailure::HostMismatch,
            ),
            (
                "IO error: error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: (IP address mismatch)",
                TlsFailure::HostMismatch,
            ),
            (
                "IO error: error:0A00010B:SSL routines:ssl3_get_record:wrong version number:../ssl/record/ssl3_record.c:354:",
                TlsFailure::NotTls,
            ),
            (
                "IO error: error:0A00045C:SSL routines:ssl3_read_bytes:tlsv13 alert certificate required:../ssl/record/rec_layer_s3.c:1605:SSL alert number 116",
                TlsFailure::ClientCertificateRefused,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(TlsFailure::recognise(text), Some(expected), "{text}");
        }
    }

    #[test]
    fn network_failures_are_not_tls_failures() {
        for text in [
            "IO error: Connection refused (os error 111)",
            "IO error: Connection reset by peer (os error 104)",
            "IO error: unexpected EOF",
            "IO error: error:0A000126:SSL routines:ssl3_read_n:unexpected eof while reading:../ssl/record/rec_layer_s3.c:317:",
            "IO error: connection timed out",
            "invalid protocol method: 0",
        ] {
            assert_eq!(TlsFailure::recognise(text), None, "{text}");
        }
    }

    #[test]
    fn messages_name_the_cause_and_the_setting() {
        let with_ca = files(Some("ca.pem"), None, None);
        let text = TlsFailure::UntrustedCertificate.message("broker", 5671, &with_ca, "x");
        assert!(text.contains("not signed by a CA we trust"), "{text}");
        assert!(
            text.contains("AMQP_CA_FILE") && text.contains("ca.pem"),
            "{text}"
        );
        let text =
            TlsFailure::UntrustedCertificate.message("broker", 5671, &TlsFiles::default(), "x");
        assert!(text.contains("AMQP_CA_FILE is not set"), "{text}");
        let text = TlsFailure::NotTls.message("127.0.0.1", 5672, &TlsFiles::default(), "x");
        assert!(text.contains("127.0.0.1:5672 does not speak TLS"), "{text}");
        let text = TlsFailure::Expired.message("h", 1, &TlsFiles::default(), "x");
        assert!(text.contains("has expired"), "{text}");
        let text = TlsFailure::HostMismatch.message("h", 1, &TlsFiles::default(), "x");
        assert!(
            text.contains("not valid for `h`") && text.contains("AMQP_URL"),
            "{text}"
        );
        let text = TlsFailure::ClientCertificateRefused.message("h", 1, &TlsFiles::default(), "x");
        assert!(text.contains("AMQP_CLIENT_CERT_FILE"), "{text}");
    }

    #[test]
    fn the_reason_is_openssls_short_text() {
        assert_eq!(
            reason(
                "IO error: error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: (certificate has expired)"
            ),
            "certificate has expired"
        );
        assert_eq!(
            reason(
                "IO error: error:0A00010B:SSL routines:ssl3_get_record:wrong version number:../ssl/record/ssl3_record.c:350:"
            ),
            "wrong version number"
        );
        assert_eq!(reason("something else"), "something else");
    }

    fn failure() -> impl Strategy<Value = TlsFailure> {
        prop_oneof![
            Just(TlsFailure::UntrustedCertificate),
            Just(TlsFailure::Expired),
            Just(TlsFailure::NotYetValid),
            Just(TlsFailure::HostMismatch),
            Just(TlsFailure::NotTls),
            Just(TlsFailure::ClientCertificateRefused),
            Just(TlsFailure::HandshakeRefused),
        ]
    }

    proptest! {
        /// Every pattern is found inside any surrounding text, whatever its case.
        #[test]
        fn patterns_are_found_in_any_context(
            index in 0..PATTERNS.len(),
            before in "[a-z0-9: ]{0,40}",
            after in "[a-z0-9: ()]{0,40}",
        ) {
            let (pattern, _) = PATTERNS[index];
            let text = format!("{before}{}{after}", pattern.to_uppercase());
            prop_assert!(TlsFailure::recognise(&text).is_some());
        }

        /// A message names the host it is about and the library's words, and carries no user
        /// info (it is built from the host, never from the URL).
        #[test]
        fn messages_name_the_broker_and_no_user_info(failure in failure(), port in 1u16..) {
            let text = failure.message("broker.example", port, &TlsFiles::default(), "the detail");
            prop_assert!(text.starts_with("TLS: "));
            prop_assert!(text.contains("broker.example"));
            prop_assert!(text.contains("the detail"));
            prop_assert!(!text.contains('@'));
        }
    }
}
