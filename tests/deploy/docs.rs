//! docs/operations.md, the operations guide: it explains every problem code,
//! and every file shipped under `deploy/` is named in it or in the README of
//! the file's directory. (The guide's metric and alert sections are checked
//! with the metrics and the alert rules.)

use crate::{deploy_files, read};

#[test]
fn operations_guide_covers_every_problem_code_and_file() {
    let docs = read("docs/operations.md");
    for code in idemgate::problem::Code::ALL {
        assert!(
            docs.contains(&format!("`{}`", code.as_str())),
            "docs/operations.md does not explain the problem code {}",
            code.as_str()
        );
    }
    // Every shipped file is named in the guide, or in the README of its directory.
    for (rel, path) in deploy_files() {
        let readme = path.with_file_name("README.md");
        let name = format!("`{}`", path.file_name().unwrap().to_str().unwrap());
        let listed =
            readme != path && std::fs::read_to_string(&readme).is_ok_and(|r| r.contains(&name));
        assert!(
            docs.contains(&rel) || listed,
            "{rel} is neither named in docs/operations.md nor listed in its directory's README.md"
        );
    }
}
