//! A test PKI: root CA -> intermediate -> one leaf per name, written in
//! certbot's layout so `fullchain.pem` is leaf + intermediate.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::Path;

pub struct Leaf {
    pub name: String,
    pub fullchain_pem: String,
    pub key_pem: String,
}

pub struct TestPki {
    pub root_pem: String,
    pub leaves: Vec<Leaf>,
    intermediate: rcgen::Certificate,
    intermediate_key: KeyPair,
}

impl TestPki {
    /// `names`: each entry is a list of SANs for one certificate.
    pub fn new(names: &[&[&str]]) -> TestPki {
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.distinguished_name.push(DnType::CommonName, "matrix-edge test root");
        let root = root_params.self_signed(&root_key).unwrap();

        let inter_key = KeyPair::generate().unwrap();
        let mut inter_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        inter_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        inter_params.distinguished_name.push(DnType::CommonName, "matrix-edge test intermediate");
        let intermediate = inter_params.signed_by(&inter_key, &root, &root_key).unwrap();

        let mut pki = TestPki { root_pem: root.pem(), leaves: Vec::new(), intermediate, intermediate_key: inter_key };
        pki.leaves = names.iter().map(|sans| pki.issue(sans)).collect();
        pki
    }

    /// A new leaf for `sans` from the same intermediate.
    pub fn issue(&self, sans: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, sans[0]);
        let cert = params.signed_by(&key, &self.intermediate, &self.intermediate_key).unwrap();
        Leaf {
            name: sans[0].trim_start_matches("*.").to_string(),
            fullchain_pem: format!("{}{}", cert.pem(), self.intermediate.pem()),
            key_pem: key.serialize_pem(),
        }
    }

    /// A leaf for `sans` that expired long ago.
    pub fn issue_expired(&self, sans: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, sans[0]);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = params.signed_by(&key, &self.intermediate, &self.intermediate_key).unwrap();
        Leaf {
            name: sans[0].to_string(),
            fullchain_pem: format!("{}{}", cert.pem(), self.intermediate.pem()),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes `DIR/<name>/fullchain.pem`, `privkey.pem` and `DIR/ca.pem`.
    pub fn copy_into(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca.pem"), &self.root_pem).unwrap();
        for leaf in &self.leaves {
            let leaf_dir = dir.join(&leaf.name);
            std::fs::create_dir_all(&leaf_dir).unwrap();
            std::fs::write(leaf_dir.join("fullchain.pem"), &leaf.fullchain_pem).unwrap();
            std::fs::write(leaf_dir.join("privkey.pem"), &leaf.key_pem).unwrap();
        }
    }
}
