//! Throwaway certificates made at run time, for the TLS tests.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A throwaway CA and a certificate for `localhost` (and a client certificate) signed by it.
pub struct Pki {
    /// The CA's certificate (PEM): what clients and an mTLS server trust.
    pub ca_pem: String,
    /// The server's certificate for `localhost` (PEM).
    pub server_cert: String,
    /// The server's private key (PEM).
    pub server_key: String,
    /// A client certificate signed by the CA (PEM).
    pub client_cert: String,
    /// The client's private key (PEM).
    pub client_key: String,
}

/// A fresh CA with a server and a client certificate.
pub fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = CertificateParams::new(vec!["client".to_string()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    }
}

/// Server TLS files from `pki`; with `mtls`, client certificates signed by its CA are required.
pub fn server_tls(pki: &Pki, mtls: bool) -> stepstream::server::TlsFiles {
    stepstream::server::TlsFiles {
        cert: pki.server_cert.clone().into_bytes(),
        key: pki.server_key.clone().into_bytes(),
        client_ca: mtls.then(|| pki.ca_pem.clone().into_bytes()),
        handshake_timeout: std::time::Duration::from_secs(5),
    }
}
