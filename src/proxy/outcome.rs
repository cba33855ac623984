//! Where decisions and failures meet the audit record — the one rescue point.
//!
//! Handlers return `Result<Response, ProxyError>`. [`respond`] is the only place a failure
//! becomes a response: it records the refusal or failure (audit fields and metrics, through
//! [`crate::error::Class`], the one table of statuses), builds the generated response, and
//! attaches the record so the event is written when the response body ends. [`admit`] is the
//! only place a policy verdict reaches the record, report mode included.

use std::sync::Arc;

use http::Response;

use crate::body::Body;
use crate::error::ProxyError;
use crate::policy::{Rule, Verdict};
use crate::telemetry::{Record, Telemetry};

/// Finishes a request's (or refused CONNECT's) record with `result` and returns what the client
/// gets.
pub fn respond(
    telemetry: &Arc<Telemetry>,
    mut record: Record,
    result: Result<Response<Body>, ProxyError>,
) -> Response<Body> {
    let response = result.unwrap_or_else(|err| {
        tracing::debug!(
            peer = %record.event.peer,
            host = %record.event.host,
            error = %err,
            "request refused"
        );
        record.fail(telemetry, &err);
        err.to_response()
    });
    telemetry.finish_response(record, response)
}

/// Records `verdict`: the rule that allowed the request, or a report-mode `would_deny` (let
/// through with no rule, so no credential, and not counted as a denial), or the denial as an
/// error for [`respond`].
pub fn admit<'s>(
    record: &mut Record,
    verdict: Verdict<'s>,
) -> Result<Option<&'s Rule>, ProxyError> {
    match verdict {
        Verdict::Allow(rule) => {
            record.rule(rule);
            Ok(Some(rule))
        }
        Verdict::WouldDeny(denial) => {
            tracing::debug!(client = %record.event.client, %denial, "would deny (report mode)");
            record.would_deny(denial.to_string());
            Ok(None)
        }
        Verdict::Deny(denial) => Err(ProxyError::Denied(denial)),
    }
}
