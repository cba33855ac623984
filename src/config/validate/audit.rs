//! Validation of `[audit]`: the output (stdout, stderr or a file relative to the config), mask
//! lists lowered once.

use std::path::Path;

use crate::config::error::Problems;
use crate::config::frozen::{AuditOutput, AuditSettings};
use crate::config::raw::RawAudit;

/// `[audit]`.
pub(super) fn audit(a: &RawAudit, base: &Path, p: &mut Problems) -> AuditSettings {
    let output = match a.output.as_str() {
        "stdout" => AuditOutput::Stdout,
        "stderr" => AuditOutput::Stderr,
        "" => {
            p.add("audit.output", "must be stdout, stderr or a file path");
            AuditOutput::Stdout
        }
        path => AuditOutput::File(base.join(path)),
    };
    // Matching is case-insensitive; lowering once here saves it per request.
    let lower = |v: &[String]| v.iter().map(|s| s.to_ascii_lowercase()).collect();
    AuditSettings {
        output,
        log_headers: a.log_headers,
        mask_headers: lower(&a.mask_headers),
        mask_query_params: lower(&a.mask_query_params),
    }
}
