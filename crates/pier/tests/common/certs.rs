//! Certificates for the TLS tests, made with openssl: a CA and certificates it signs, plus
//! one signed by another CA.

use std::path::Path;
use std::process::Command;

pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA (`ca.pem`) and, signed by it, `<name>.pem` / `<name>.key` for each of `names`, valid
/// for 127.0.0.1 as servers and clients; plus `stranger`, signed by a CA of its own.
pub fn make_certs(dir: &Path, names: &[&str]) {
    make_certs_for(dir, names, "IP:127.0.0.1,DNS:localhost")
}

/// [`make_certs`] with the subject alternative names `sans` (`IP:…,DNS:…`).
pub fn make_certs_for(dir: &Path, names: &[&str], sans: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    std::fs::write(
        dir.join("ext"),
        format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"),
    )
    .unwrap();
    for ca in ["ca", "other-ca"] {
        let (key, pem, subj) = (
            format!("{ca}.key"),
            format!("{ca}.pem"),
            format!("/CN={ca}"),
        );
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
        openssl(dir, &a);
    }
    for (name, ca) in names
        .iter()
        .map(|n| (*n, "ca"))
        .chain([("stranger", "other-ca")])
    {
        let (key, csr, pem, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("/CN={name}"),
        );
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                "ext",
            ],
        );
    }
}
