//! What a notification says: V1 or V2, its type, environment and app, read from the bytes without
//! changing them. Apple adds types, subtypes and fields without notice, so nothing unknown is an error;
//! only a body that is not JSON at all is.

mod fields;

use std::borrow::Cow;
use std::fmt;

use app_store_server_library::crypto::jws;
use fields::{Fields, ObjectOf, Scalar};
use serde::de::MapAccess;
use sha2::{Digest, Sha256};
use storerelay_config::{Environment, NotificationVersion, RouteFacts};

/// Apple's documented `notificationType` values (V2 and V1). Anything else is reported as `other` in
/// metrics, so a stream of made-up types cannot grow the label set without bound.
const DOCUMENTED_TYPES: &[&str] = &[
    // V2
    "CONSUMPTION_REQUEST",
    "DID_CHANGE_RENEWAL_PREF",
    "DID_CHANGE_RENEWAL_STATUS",
    "DID_FAIL_TO_RENEW",
    "DID_RENEW",
    "EXPIRED",
    "EXTERNAL_PURCHASE_TOKEN",
    "GRACE_PERIOD_EXPIRED",
    "METADATA_UPDATE",
    "MIGRATION",
    "OFFER_REDEEMED",
    "ONE_TIME_CHARGE",
    "PRICE_CHANGE",
    "PRICE_INCREASE",
    "REFUND",
    "REFUND_DECLINED",
    "REFUND_REVERSED",
    "RENEWAL_EXTENDED",
    "RENEWAL_EXTENSION",
    "RESCIND_CONSENT",
    "REVOKE",
    "SUBSCRIBED",
    "TEST",
    // V1 only
    "CANCEL",
    "DID_RECOVER",
    "INITIAL_BUY",
    "INTERACTIVE_RENEWAL",
    "PRICE_INCREASE_CONSENT",
    "RENEWAL",
];

/// The decoded summary of one body.
#[derive(Clone, Default)]
pub struct Notification {
    /// `None`: JSON of neither shape.
    pub version: Option<NotificationVersion>,
    pub notification_type: Option<String>,
    pub subtype: Option<String>,
    pub uuid: Option<String>,
    pub environment: Option<Environment>,
    pub bundle_id: Option<String>,
    pub app_apple_id: Option<i64>,
    /// V2 `signedDate`, unix milliseconds.
    pub signed_date: Option<i64>,
    /// A V2 body whose `signedPayload` could not be read as a JWS with a JSON payload.
    pub malformed: Option<String>,
    /// V1: the app's shared secret. Never printed (see the `Debug` impl).
    pub v1_password: Option<String>,
    /// Duplicate key: `v2:<notificationUUID>`, else `sha256:<hex of the body>`.
    pub dedupe_key: String,
}

impl fmt::Debug for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notification")
            .field("version", &self.version)
            .field("notification_type", &self.notification_type)
            .field("subtype", &self.subtype)
            .field("uuid", &self.uuid)
            .field("environment", &self.environment)
            .field("bundle_id", &self.bundle_id)
            .field("app_apple_id", &self.app_apple_id)
            .field("signed_date", &self.signed_date)
            .field("malformed", &self.malformed)
            .field("v1_password", &self.v1_password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("body is not JSON")]
    NotJson,
}

impl Notification {
    pub fn route_facts(&self) -> RouteFacts<'_> {
        RouteFacts {
            version: self.version,
            environment: self.environment,
            bundle_id: self.bundle_id.as_deref(),
            notification_type: self.notification_type.as_deref(),
            subtype: self.subtype.as_deref(),
        }
    }

    pub fn version_label(&self) -> &'static str {
        match self.version {
            Some(NotificationVersion::V1) => "v1",
            Some(NotificationVersion::V2) => "v2",
            None => "unknown",
        }
    }

    pub fn environment_label(&self) -> &'static str {
        self.environment.map_or("unknown", Environment::as_str)
    }

    /// The type for metrics: a documented value, `other`, or `unknown` when absent.
    pub fn type_label(&self) -> &str {
        match self.notification_type.as_deref() {
            Some(t) if DOCUMENTED_TYPES.contains(&t) => t,
            Some(_) => "other",
            None => "unknown",
        }
    }
}

/// Reads a body. Only non-JSON is an error; everything else yields what could be learnt.
///
/// The body and the JWS payload are walked once each for the fields below ([`fields`]); nothing else
/// in them is kept, so memory stays proportional to the body whatever it contains.
pub fn decode(body: &[u8]) -> Result<Notification, DecodeError> {
    let top = fields::object::<Body>(body).map_err(|_| DecodeError::NotJson)?;
    let mut notification = Notification::default();
    let Some(top) = top else {
        notification.dedupe_key = body_key(body);
        return Ok(notification);
    };

    if let Some(signed) = top.signed_payload {
        notification.version = Some(NotificationVersion::V2);
        match signed.as_str() {
            Some(jws) => match jws::decode_payload_bytes(jws) {
                Ok(payload) => match fields::object::<Payload>(&payload) {
                    Ok(Some(payload)) => read_v2_payload(&payload, &mut notification),
                    Ok(None) => {}
                    Err(_) => notification.malformed = Some("signedPayload: the payload is not JSON".into()),
                },
                Err(error) => notification.malformed = Some(format!("signedPayload: {error}")),
            },
            None => notification.malformed = Some("signedPayload is not a string".into()),
        }
    } else if top.notification_type.is_some() {
        notification.version = Some(NotificationVersion::V1);
        let text = |field: &Option<Scalar>| field.as_ref().and_then(Scalar::text);
        notification.notification_type = text(&top.notification_type);
        notification.environment = top.environment.as_ref().and_then(Scalar::as_str).and_then(Environment::parse);
        notification.bundle_id = text(&top.bid);
        notification.v1_password = text(&top.password);
    }
    // Hashing a 20 KB body costs more than the rest of decoding: only when there is no UUID.
    notification.dedupe_key = match &notification.uuid {
        Some(uuid) => format!("v2:{uuid}"),
        None => body_key(body),
    };
    Ok(notification)
}

/// A V2 body's JWS, for verification. Read from the body again rather than kept in every
/// [`Notification`]: it is most of the body, and only verification (off by default) needs it.
pub fn signed_payload(body: &[u8]) -> Option<Cow<'_, str>> {
    match fields::object::<Body>(body).ok()??.signed_payload? {
        Scalar::Text(jws) => Some(jws),
        _ => None,
    }
}

/// The top level of a body: V2's one field and the V1 fields we route and verify by. A key that is
/// present with a value of another type is `Some(Scalar::Other)`: its presence alone says the version.
#[derive(Default)]
struct Body<'a> {
    signed_payload: Option<Scalar<'a>>,
    notification_type: Option<Scalar<'a>>,
    environment: Option<Scalar<'a>>,
    bid: Option<Scalar<'a>>,
    password: Option<Scalar<'a>>,
}

impl<'de> Fields<'de> for Body<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        let slot = match key {
            "signedPayload" => &mut self.signed_payload,
            "notification_type" => &mut self.notification_type,
            "environment" => &mut self.environment,
            "bid" => &mut self.bid,
            "password" => &mut self.password,
            _ => return Ok(false),
        };
        *slot = Some(map.next_value()?);
        Ok(true)
    }
}

/// The decoded V2 payload (`responseBodyV2DecodedPayload`), as far as we read it.
#[derive(Default)]
struct Payload<'a> {
    notification_type: Scalar<'a>,
    subtype: Scalar<'a>,
    uuid: Scalar<'a>,
    signed_date: Scalar<'a>,
    /// `data`, `summary`, `externalPurchaseToken`, `appData`: the app's identity sits in whichever one
    /// this type of notification carries, looked for in that order.
    sections: [Option<Section<'a>>; 4],
}

const SECTIONS: [&str; 4] = ["data", "summary", "externalPurchaseToken", "appData"];

impl<'de> Fields<'de> for Payload<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        let slot = match key {
            "notificationType" => &mut self.notification_type,
            "subtype" => &mut self.subtype,
            "notificationUUID" => &mut self.uuid,
            "signedDate" => &mut self.signed_date,
            _ => match SECTIONS.iter().position(|section| *section == key) {
                Some(index) => {
                    self.sections[index] = map.next_value::<ObjectOf<Section>>()?.0;
                    return Ok(true);
                }
                None => return Ok(false),
            },
        };
        *slot = map.next_value()?;
        Ok(true)
    }
}

#[derive(Default)]
struct Section<'a> {
    bundle_id: Scalar<'a>,
    app_apple_id: Scalar<'a>,
    environment: Scalar<'a>,
    external_purchase_id: Scalar<'a>,
}

impl<'de> Fields<'de> for Section<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        let slot = match key {
            "bundleId" => &mut self.bundle_id,
            "appAppleId" => &mut self.app_apple_id,
            "environment" => &mut self.environment,
            "externalPurchaseId" => &mut self.external_purchase_id,
            _ => return Ok(false),
        };
        *slot = map.next_value()?;
        Ok(true)
    }
}

fn body_key(body: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(body)))
}

fn read_v2_payload(payload: &Payload, notification: &mut Notification) {
    notification.notification_type = payload.notification_type.text();
    notification.subtype = payload.subtype.text();
    notification.uuid = payload.uuid.text();
    notification.signed_date = payload.signed_date.integer();
    let section = payload.sections.iter().zip(SECTIONS).find_map(|(section, key)| section.as_ref().map(|s| (key, s)));
    if let Some((key, section)) = section {
        notification.bundle_id = section.bundle_id.text();
        notification.app_apple_id = section.app_apple_id.integer();
        notification.environment = if key == "externalPurchaseToken" {
            // External purchase tokens carry no environment; Apple marks sandbox ones by their id.
            let sandbox = section.external_purchase_id.as_str().is_some_and(|id| id.starts_with("SANDBOX"));
            Some(if sandbox { Environment::Sandbox } else { Environment::Production })
        } else {
            section.environment.as_str().and_then(Environment::parse)
        };
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn v2(payload: &str) -> Vec<u8> {
        let jws = format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode("{\"alg\":\"ES256\"}"), URL_SAFE_NO_PAD.encode(payload));
        format!("{{\"signedPayload\":\"{jws}\"}}").into_bytes()
    }

    #[test]
    fn v2_fields_come_from_whichever_section_is_present() {
        let n = decode(&v2(r#"{"notificationType":"DID_RENEW","subtype":"BILLING_RECOVERY","notificationUUID":"u-1","version":"2.0","signedDate":1700000000000,"data":{"environment":"Sandbox","bundleId":"com.example","appAppleId":1234}}"#)).unwrap();
        assert_eq!(n.version, Some(NotificationVersion::V2));
        assert_eq!(n.notification_type.as_deref(), Some("DID_RENEW"));
        assert_eq!(n.subtype.as_deref(), Some("BILLING_RECOVERY"));
        assert_eq!(n.environment, Some(Environment::Sandbox));
        assert_eq!(n.bundle_id.as_deref(), Some("com.example"));
        assert_eq!(n.app_apple_id, Some(1234));
        assert_eq!(n.signed_date, Some(1_700_000_000_000));
        assert_eq!(n.dedupe_key, "v2:u-1");

        let n = decode(&v2(r#"{"notificationType":"RESCIND_CONSENT","appData":{"environment":"Production","bundleId":"b","appAppleId":9}}"#)).unwrap();
        assert_eq!((n.environment, n.app_apple_id), (Some(Environment::Production), Some(9)));
    }

    #[test]
    fn external_purchase_tokens_take_the_environment_from_their_id() {
        let sandbox = decode(&v2(r#"{"notificationType":"EXTERNAL_PURCHASE_TOKEN","externalPurchaseToken":{"externalPurchaseId":"SANDBOX_1","bundleId":"b","appAppleId":5}}"#)).unwrap();
        assert_eq!(sandbox.environment, Some(Environment::Sandbox));
        let production = decode(&v2(r#"{"notificationType":"EXTERNAL_PURCHASE_TOKEN","externalPurchaseToken":{"externalPurchaseId":"b2158121","bundleId":"b"}}"#)).unwrap();
        assert_eq!(production.environment, Some(Environment::Production));
    }

    #[test]
    fn unknown_values_never_fail_and_are_labelled_other() {
        let n = decode(&v2(r#"{"notificationType":"SOMETHING_NEW","subtype":"NEWER","brandNewField":{"x":1},"data":{"environment":"Moon"}}"#)).unwrap();
        assert_eq!(n.type_label(), "other");
        assert_eq!(n.environment, None);
        assert_eq!(n.environment_label(), "unknown");
        assert!(n.malformed.is_none());
    }

    #[test]
    fn v1_fields_and_the_secret_stays_out_of_debug() {
        let body = br#"{"notification_type":"INITIAL_BUY","environment":"PROD","bid":"com.example","password":"S3CRET","unified_receipt":{}}"#;
        let n = decode(body).unwrap();
        assert_eq!(n.version, Some(NotificationVersion::V1));
        assert_eq!(n.environment, Some(Environment::Production));
        assert_eq!(n.bundle_id.as_deref(), Some("com.example"));
        assert_eq!(n.v1_password.as_deref(), Some("S3CRET"));
        assert!(n.dedupe_key.starts_with("sha256:") && n.dedupe_key.len() == 71);
        assert!(!format!("{n:?}").contains("S3CRET"));
    }

    #[test]
    fn arrays_where_objects_belong_are_skipped_not_errors() {
        let zeros = format!("[{}0]", "0,".repeat(10_000));
        assert_eq!(decode(zeros.as_bytes()).unwrap().version, None);
        let n = decode(&v2(&zeros)).unwrap();
        assert_eq!((n.version, n.notification_type, n.malformed), (Some(NotificationVersion::V2), None, None));
        let n = decode(&v2(r#"{"notificationType":"TEST","data":[1,2],"summary":{"bundleId":"b"}}"#)).unwrap();
        assert_eq!(n.bundle_id.as_deref(), Some("b"), "a section that is not an object is passed over");
        let n = decode(&v2(r#"{"notificationType":"TEST"#)).unwrap();
        assert_eq!(n.malformed.as_deref(), Some("signedPayload: the payload is not JSON"));
    }

    #[test]
    fn other_json_is_unknown_and_non_json_is_an_error() {
        assert_eq!(decode(br#"{"hello":"world"}"#).unwrap().version, None);
        assert_eq!(decode(b"[1,2]").unwrap().version, None);
        assert_eq!(decode(b"not json").unwrap_err(), DecodeError::NotJson);
        assert_eq!(decode(b"").unwrap_err(), DecodeError::NotJson);
        let broken = decode(br#"{"signedPayload":"abc"}"#).unwrap();
        assert_eq!(broken.version, Some(NotificationVersion::V2));
        assert!(broken.malformed.is_some());
    }

    #[test]
    fn the_jws_is_read_again_from_the_body_only_for_verification() {
        let body = v2(r#"{"notificationType":"TEST"}"#);
        let text = String::from_utf8(body.clone()).unwrap();
        let jws = text.split('"').nth(3).unwrap();
        assert_eq!(signed_payload(&body).as_deref(), Some(jws));
        assert!(matches!(signed_payload(&body), Some(Cow::Borrowed(_))), "not copied out of the body");
        let escaped = format!(r#"{{"signedPayload":"{}"}}"#, jws.replace('.', r"\u002e"));
        assert_eq!(signed_payload(escaped.as_bytes()).as_deref(), Some(jws), "JSON escapes are undone");
        assert_eq!(signed_payload(br#"{"signedPayload":7}"#), None);
        assert_eq!(signed_payload(br#"{"notification_type":"RENEWAL"}"#), None);
        assert_eq!(signed_payload(b"not json"), None);
    }
}
