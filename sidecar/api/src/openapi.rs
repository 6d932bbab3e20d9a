//! OpenAPI schemas for the policy vocabulary the contract borrows from the filter
//! (`HttpsMode`, `RedirectKind`, `MixedContent`): their values are read from the filter's own
//! serde names, so the document lists exactly what the API accepts.

use std::borrow::Cow;

use serde::Serialize;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::{HttpsMode, MixedContent, RedirectKind};

/// Every HTTPS mode. The match below stops compiling when the filter adds one.
const HTTPS_MODES: [HttpsMode; 3] = [HttpsMode::Auto, HttpsMode::Force, HttpsMode::Disable];
const _: fn(HttpsMode) = |mode| match mode {
    HttpsMode::Auto | HttpsMode::Force | HttpsMode::Disable => {}
};

/// Every redirect kind (the match below stops compiling when the filter adds one).
const REDIRECT_KINDS: [RedirectKind; 2] = [RedirectKind::Permanent, RedirectKind::Temporary];
const _: fn(RedirectKind) = |kind| match kind {
    RedirectKind::Permanent | RedirectKind::Temporary => {}
};

/// Every mixed-content mode (the match below stops compiling when the filter adds one).
const MIXED_CONTENT_MODES: [MixedContent; 3] = [
    MixedContent::Off,
    MixedContent::Upgrade,
    MixedContent::Report,
];
const _: fn(MixedContent) = |mode| match mode {
    MixedContent::Off | MixedContent::Upgrade | MixedContent::Report => {}
};

/// The JSON string a value of the vocabulary is written as.
fn wire_name(value: impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        // The vocabulary is plain unit enums: they always serialise as strings.
        other => format!("{other:?}"),
    }
}

fn string_enum<T: Serialize + Copy>(description: &str, values: &[T]) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .enum_values(Some(values.iter().map(|v| wire_name(*v))))
        .into()
}

/// The schema of [`HttpsMode`] (a type of the filter's, described here).
#[derive(Debug)]
pub struct HttpsModeSchema;

impl PartialSchema for HttpsModeSchema {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "auto: HTTP and HTTPS both served; force: HTTP redirected to HTTPS (once the target name has a certificate); disable: HTTPS redirected to HTTP, with HSTS max-age=0.",
            &HTTPS_MODES,
        )
    }
}

impl ToSchema for HttpsModeSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("HttpsMode")
    }
}

/// The schema of [`RedirectKind`].
#[derive(Debug)]
pub struct RedirectKindSchema;

impl PartialSchema for RedirectKindSchema {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "permanent: 301 for GET/HEAD, 308 otherwise; temporary: 302 for GET/HEAD, 307 otherwise.",
            &REDIRECT_KINDS,
        )
    }
}

impl ToSchema for RedirectKindSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("RedirectKind")
    }
}

/// The schema of [`MixedContent`].
#[derive(Debug)]
pub struct MixedContentSchema;

impl PartialSchema for MixedContentSchema {
    fn schema() -> RefOr<Schema> {
        string_enum(
            "off: no header; upgrade: Content-Security-Policy: upgrade-insecure-requests; report: a report-only policy whose reports the sidecar collects per page.",
            &MIXED_CONTENT_MODES,
        )
    }
}

impl ToSchema for MixedContentSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("MixedContent")
    }
}
