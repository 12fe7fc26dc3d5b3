"""Generate cio_pipelines_api.json, our OpenAPI 3.1 view of the Customer.io Data Pipelines API.

The data below is written from the facts of Customer.io's published document (paths, field
names, types, enums, required lists and limits); the prose is ours. Run

    .venv/bin/python scripts/build_spec.py          # rewrite the JSON
    .venv/bin/python scripts/build_spec.py --check  # exit 1 if the committed JSON is stale

tests/test_spec.py checks that the committed JSON equals what this script generates.

Schemas use only keywords that both JSON Schema 2020-12 and draft-07 understand, so that
cio_outbox.spec can compile them with fastjsonschema after inlining the $refs (no recursion).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "cio_pipelines_api.json"
VERSION = "1.0.0"

MAX_MESSAGE_BYTES = 32768
MAX_BATCH_BYTES = 500000

Schema = dict[str, Any]


# Compact notation: a type name, a list [item] for an array, or a ready-made schema dict.
def s(spec: Any) -> Schema:
    if isinstance(spec, str):
        if spec == "date-time":
            return {"type": "string", "format": "date-time"}
        if spec == "id":
            return {"type": "string", "minLength": 1}
        return {"type": spec}
    if isinstance(spec, list):
        (item,) = spec
        return {"type": "array", "items": s(item)}
    return spec


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    out: Schema = {"type": "object"}
    out.update(extra)
    if required:
        out["required"] = list(required)
    out["properties"] = {k: s(v) for k, v in props.items()}
    return out


def enum(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

CONTEXT = obj(
    {
        "active": "boolean",
        "ip": "string",
        "locale": "string",
        "userAgent": "string",
        "timezone": "string",
        "channel": enum("browser", "server", "mobile"),
        "campaign": obj(
            {"name": "string", "source": "string", "medium": "string", "term": "string",
             "content": "string"},
            additionalProperties={"type": "string"},
        ),
        "page": obj(
            {"name": "string", "path": "string", "referrer": "string", "search": "string",
             "title": "string", "url": "string", "keywords": ["string"]}
        ),
        "app": obj({"name": "string", "version": "string", "build": "string",
                    "namespace": "string"}),
        "device": obj(
            {"id": "string", "advertisingId": "string", "manufacturer": "string",
             "model": "string", "name": "string", "token": "string",
             # Customer.io lists android and ios for mobile contexts, but its context is a
             # oneOf whose non-mobile branch does not constrain device, so "web" (or any
             # other string) is valid as published. Push devices (the semantic device
             # events) keep the two platforms.
             "type": {"type": "string", "description": "android or ios for push devices; "
                      "other platforms send their own name (for example web)."},
             "version": "string"}
        ),
        "network": obj({"bluetooth": "boolean", "carrier": "string", "cellular": "boolean",
                        "wifi": "boolean"}),
        "os": obj({"name": "string", "version": "string"}),
        "library": obj({"name": "string", "version": "string"}),
        "traits": obj({}),
    },
    description=(
        "Context about the call: where it came from (app, device, page, campaign, network, "
        "os, library) and about whom. Source libraries fill most of it in. Other keys are "
        "accepted as they are."
    ),
)

INTEGRATIONS: Schema = {
    "type": "object",
    "description": (
        "Turns destinations on (true) or off (false) for this call. Everything is on by "
        'default; {"All": false} turns everything off so you can list the few to keep.'
    ),
    "additionalProperties": {"type": "boolean"},
}

COMMON_PROPERTIES: dict[str, Schema] = {
    "messageId": ref("messageId"),
    "timestamp": ref("timestamp"),
    "sentAt": ref("sentAt"),
    "originalTimestamp": ref("originalTimestamp"),
    "context": ref("context"),
    "integrations": ref("integrations"),
}

IDENTITY_ANY_OF = [{"required": ["userId"]}, {"required": ["anonymousId"]}]

PRODUCT_FIELDS: dict[str, Any] = {
    "product_id": "string", "sku": "string", "category": "string", "name": "string",
    "brand": "string", "variant": "string", "price": "number", "quantity": "integer",
    "coupon": "string", "position": "number", "url": "string", "image_url": "string",
}
PRODUCTS = {"type": "array", "items": ref("ecommerce_product")}
ORDER_FIELDS: dict[str, Any] = {
    "order_id": "string", "affiliation": "string", "revenue": "number", "shipping": "number",
    "tax": "number", "discount": "number", "coupon": "string", "currency": "string",
    "products": PRODUCTS,
}
CHECKOUT_STEP_FIELDS: dict[str, Any] = {
    "checkout_id": "string", "step": "integer", "shipping_method": "string",
    "payment_method": "string",
}
PROMOTION_FIELDS: dict[str, Any] = {
    "promotion_id": "string", "creative": "string", "name": "string", "position": "string",
}
COUPON_FIELDS: dict[str, Any] = {"order_id": "string", "cart_id": "string", "coupon_id": "string"}
WISHLIST_FIELDS: dict[str, Any] = {"wishlist_id": "string", "wishlist_name": "string"}
SHARE_FIELDS: dict[str, Any] = {
    "share_via": "string", "share_message": "string", "recipient": "string",
}
LIST_FIELDS: dict[str, Any] = {"list_id": "string", "category": "string", "products": PRODUCTS}
FILTER = obj({"type": "string", "value": "string"})

EMAIL_FIELDS: dict[str, Any] = {
    "email_id": "string", "email_subject": "string", "campaign_id": "string",
    "campaign_name": "string",
}
EMAIL_TRAITS_BASIC = {"email": "string"}
EMAIL_TRAITS_FULL = {"email": "string", "ip": "string", "user_agent": "string"}

LIVE_CHAT_FIELDS: dict[str, Any] = {
    "agent_id": "string", "agent_name": "string", "agent_username": "string",
    "conversation_id": "string", "conversation_duration": "integer", "message_id": "string",
}

PLAYBACK_FIELDS: dict[str, Any] = {
    "session_id": "string", "ad_asset_id": "string", "ad_pod_id": "string",
    "ad_type": enum("pre-roll", "mid-roll", "post-roll"), "position": "integer",
    "total_length": "integer", "bitrate": "integer", "framerate": "integer",
    "video_player": "string", "sound": {"type": "integer", "minimum": 0, "maximum": 100},
    "full_screen": "boolean", "ad_enabled": "boolean", "quality": "string",
    "livestream": "boolean",
}
CONTENT_ASSET = {"content_asset_id": "string", "content_pod_id": "string"}
CONTENT_FIELDS: dict[str, Any] = {
    "session_id": "string", "asset_id": "string", "pod_id": "string", "program": "string",
    "title": "string", "description": "string", "season": "string", "position": "integer",
    "total_length": "integer", "genre": "string", "publisher": "string", "channel": "string",
    "full_episode": "boolean", "livestream": "boolean", "airdate": "date-time",
    "bitrate": "integer", "framerate": "integer", "keywords": ["string"],
}
AD_FIELDS: dict[str, Any] = {
    "session_id": "string", "asset_id": "string", "pod_id": "string",
    "pod_position": "integer", "pod_length": "integer",
    "type": enum("pre-roll", "mid-roll", "post-roll"), "title": "string",
    "position": "integer", "total_length": "integer", "publisher": "string",
    "load_type": enum("dynamic", "linear"), "content": "object", "quartile": "integer",
}
OBJECT_REF_FIELDS: dict[str, Any] = {"objectId": "id", "objectTypeId": "integer"}


# ---------------------------------------------------------------------------------------------
# Semantic events
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    name: str
    category: str
    description: str
    properties: dict[str, Any] | None = None  # None: any JSON object
    required_properties: tuple[str, ...] = ()
    identity: str = "either"  # "user" | "anonymous" | "either"
    properties_object_required: bool = False
    device_token: bool = False
    context_traits: dict[str, Any] | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _p(*groups: dict[str, Any], **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g in groups:
        out.update(g)
    out.update(more)
    return out


EC, EM, MO, VI, LC = "ecommerce", "email", "mobile", "video", "live_chat"

EVENTS: list[Event] = [
    # A/B tests
    Event("Experiment Viewed", "ab_test", "A person saw a variant of an A/B test.",
          {"experiment_id": "string", "experiment_name": "string", "variation_id": "string",
           "variation_name": "string"}),
    # Ecommerce: browsing
    Event("Products Searched", EC, "A person searched for products.", {"query": "string"}),
    Event("Product List Viewed", EC, "A person viewed a list or category of products.",
          LIST_FIELDS),
    Event("Product List Filtered", EC, "A person filtered or sorted a list of products.",
          _p(LIST_FIELDS, filters={"type": "array", "items": FILTER},
             sorts={"type": "array", "items": FILTER})),
    Event("Promotion Viewed", EC, "A person saw a promotion.", PROMOTION_FIELDS),
    Event("Promotion Clicked", EC, "A person clicked a promotion.", PROMOTION_FIELDS),
    Event("Product Clicked", EC, "A person clicked a product.",
          _p(PRODUCT_FIELDS, currency="string", value="number")),
    Event("Product Viewed", EC, "A person viewed a product.",
          _p(PRODUCT_FIELDS, currency="string", value="number")),
    # Ecommerce: cart and checkout
    Event("Product Added", EC, "A person added a product to their cart.",
          _p(PRODUCT_FIELDS, cart_id="string")),
    Event("Product Removed", EC, "A person removed a product from their cart.",
          _p(PRODUCT_FIELDS, cart_id="string")),
    Event("Cart Viewed", EC, "A person viewed their cart.",
          {"cart_id": "string", "products": PRODUCTS}),
    Event("Checkout Started", EC, "A person started checking out.",
          _p(ORDER_FIELDS, value="number")),
    Event("Checkout Step Viewed", EC, "A person viewed a checkout step.", CHECKOUT_STEP_FIELDS),
    Event("Checkout Step Completed", EC, "A person completed a checkout step.",
          CHECKOUT_STEP_FIELDS),
    Event("Payment Info Entered", EC, "A person entered their payment information.",
          _p(CHECKOUT_STEP_FIELDS, order_id="string"),
          notes=("Named as in Customer.io's list of semantic event names; the title of the "
                 "published schema reads 'Payment Info Updated'.")),
    # Ecommerce: orders
    Event("Order Updated", EC, "A person changed an order.", ORDER_FIELDS),
    Event("Order Completed", EC, "A person completed an order or transaction.",
          _p(ORDER_FIELDS, subtotal="number", checkout_id="string", total="number")),
    Event("Order Refunded", EC, "An order was refunded, in whole or in part.",
          _p(ORDER_FIELDS, total="number", subtotal="number", checkout_id="string")),
    Event("Order Cancelled", EC, "A person cancelled an order.",
          _p(ORDER_FIELDS, total="number")),
    # Ecommerce: coupons
    Event("Coupon Entered", EC, "A person entered a coupon code.", COUPON_FIELDS),
    Event("Coupon Applied", EC, "A coupon was applied to a cart or order.",
          _p(COUPON_FIELDS, coupon_name="string", discount="number")),
    Event("Coupon Denied", EC, "A coupon was rejected.",
          _p(COUPON_FIELDS, coupon_name="string", reason="string")),
    Event("Coupon Removed", EC, "A coupon was removed from a cart or order.",
          _p(COUPON_FIELDS, coupon_name="string", discount="number")),
    # Ecommerce: wishlists, sharing, reviews
    Event("Product Added to Wishlist", EC, "A person added a product to a wishlist.",
          _p(WISHLIST_FIELDS, PRODUCT_FIELDS)),
    Event("Product Removed from Wishlist", EC, "A person removed a product from a wishlist.",
          _p(WISHLIST_FIELDS, PRODUCT_FIELDS),
          notes=("Named as in Customer.io's list of semantic event names; the title of the "
                 "published schema capitalises 'From'.")),
    Event("Wishlist Product Added to Cart", EC,
          "A person moved a product from a wishlist to their cart.",
          _p(WISHLIST_FIELDS, {"cart_id": "string"}, PRODUCT_FIELDS),
          notes=("Named as in Customer.io's list of semantic event names; the title of the "
                 "published schema reads 'Wishlisted Item Added to Cart'.")),
    Event("Product Shared", EC, "A person shared a product.",
          _p(SHARE_FIELDS, {k: v for k, v in PRODUCT_FIELDS.items()
                            if k not in ("quantity", "coupon", "position")})),
    Event("Cart Shared", EC, "A person shared their cart.",
          _p(SHARE_FIELDS, cart_id="string",
             products={"type": "array", "items": obj({"product_id": "string"})})),
    Event("Product Reviewed", EC, "A person reviewed a product.",
          {"product_id": "string", "review_id": "string", "review_body": "string",
           "rating": "integer"}),
    # Email
    Event("Email Bounced", EM, "An email could not be delivered to its recipient.",
          EMAIL_FIELDS, ("email_id",), context_traits=EMAIL_TRAITS_BASIC),
    Event("Email Delivered", EM, "An email reached its recipient's mail server.",
          EMAIL_FIELDS, ("email_id",), context_traits=EMAIL_TRAITS_BASIC),
    Event("Email Opened", EM, "A recipient opened an email.",
          EMAIL_FIELDS, ("email_id",), context_traits=EMAIL_TRAITS_FULL),
    Event("Email Link Clicked", EM, "A recipient clicked a link in an email.",
          _p(EMAIL_FIELDS, link_id="string", link_url="string"), ("email_id",),
          context_traits=EMAIL_TRAITS_FULL),
    Event("Email Marked as Spam", EM, "A recipient marked an email as spam.",
          EMAIL_FIELDS, ("email_id",), context_traits=EMAIL_TRAITS_FULL),
    Event("Email Unsubscribed", EM, "A recipient unsubscribed through an email.",
          _p(EMAIL_FIELDS, list_id="string", list_name="string"), ("email_id",),
          context_traits=EMAIL_TRAITS_FULL),
    # Live chat
    Event("Live Chat Conversation Started", LC, "A person started a chat with an agent.",
          LIVE_CHAT_FIELDS),
    Event("Live Chat Conversation Ended", LC, "A chat conversation ended.", LIVE_CHAT_FIELDS),
    Event("Live Chat Message Sent", LC, "An agent sent a chat message to a person.",
          LIVE_CHAT_FIELDS),
    Event("Live Chat Message Received", LC, "A chat message arrived from a person.",
          LIVE_CHAT_FIELDS),
    # Mobile application lifecycle
    Event("Application Installed", MO, "The app was opened for the first time after install.",
          {"version": "string", "build": "string"}),
    Event("Application Opened", MO, "The app was launched or brought back (after the first "
          "open).", {"from_background": "boolean", "url": "string", "version": "string",
                     "build": "string"}),
    Event("Application Backgrounded", MO, "The app went to the background."),
    Event("Application Foregrounded", MO, "The app came back from the background."),
    Event("Application Updated", MO, "The app was opened for the first time after an update.",
          {"previous_version": "string", "previous_build": "string", "version": "string",
           "build": "string"}),
    Event("Application Uninstalled", MO, "The app was uninstalled."),
    Event("Application Crashed", MO, "The app crashed."),
    # Video: playback
    Event("Video Playback Started", VI, "A person pressed play and playback began.",
          _p({"content_asset_ids": ["string"], "content_pod_ids": ["string"]},
             PLAYBACK_FIELDS)),
    Event("Video Playback Paused", VI, "A person paused playback.",
          _p(CONTENT_ASSET, PLAYBACK_FIELDS)),
    Event("Video Playback Interrupted", VI,
          "Playback stopped on an error, a network loss or buffering.",
          _p({"method": "string"}, CONTENT_ASSET, PLAYBACK_FIELDS),
          notes=("Named as the published schema's title; the list of semantic event names "
                 "spells it 'Video Playback interrupted'.")),
    Event("Video Playback Buffer Started", VI, "Playback started buffering.",
          _p(CONTENT_ASSET, PLAYBACK_FIELDS)),
    Event("Video Playback Buffer Completed", VI, "Playback finished buffering.",
          _p(CONTENT_ASSET, PLAYBACK_FIELDS)),
    Event("Video Playback Seek Started", VI, "A person started seeking to a new position.",
          _p(CONTENT_ASSET, PLAYBACK_FIELDS)),
    Event("Video Playback Seek Completed", VI, "A person finished seeking.",
          _p(CONTENT_ASSET, PLAYBACK_FIELDS)),
    Event("Video Playback Resumed", VI, "A person resumed paused playback.",
          _p(CONTENT_ASSET, PLAYBACK_FIELDS)),
    Event("Video Playback Completed", VI, "A playback session finished.",
          _p(CONTENT_ASSET, PLAYBACK_FIELDS)),
    Event("Video Playback Exited", VI, "A person left the playback (page, scroll, app).",
          _p(CONTENT_ASSET, PLAYBACK_FIELDS)),
    # Video: content and ads
    Event("Video Content Started", VI, "A piece of content started within a playback session.",
          CONTENT_FIELDS),
    Event("Video Content Playing", VI, "Heartbeat while content plays (position so far).",
          CONTENT_FIELDS),
    Event("Video Content Completed", VI, "A piece of content finished playing.",
          CONTENT_FIELDS),
    Event("Video Ad Started", VI, "An ad started within a playback session.", AD_FIELDS),
    Event("Video Ad Playing", VI, "Heartbeat while an ad plays (position so far).", AD_FIELDS),
    Event("Video Ad Completed", VI, "An ad finished playing.", AD_FIELDS),
    Event("Video Quality Updated", VI, "Playback quality changed.",
          {"bitrate": "integer", "framerate": "integer", "startupTime": "integer",
           "droppedFrames": "integer"},
          notes="Named after the published schema video_quality_updated, which has no title."),
    # Customer.io: people
    Event("User Deleted", "people",
          "Deletes the person (userId may be an email address) from the workspace.",
          identity="user"),
    Event("User Suppressed", "people",
          "Deletes the person and stops the same identifier from being added again; meant "
          "for compliance requests.", identity="user"),
    Event("User Unsuppressed", "people",
          "Lets a suppressed identifier be added again (nothing is restored).",
          identity="user"),
    # Customer.io: devices
    Event("Device Created or Updated", "device",
          "Adds the device in context.device.token to the person, or updates it.",
          identity="user", device_token=True),
    Event("Device Deleted", "device", "Removes the device in context.device.token.",
          identity="user", device_token=True),
    # Customer.io: objects and relationships
    Event("Object Deleted", "object",
          "Deletes an object (group). anonymousId must be set but its value is not used. "
          "Customer.io's prose asks for properties.objectId, but its schema does not require "
          "it; neither does ours.",
          OBJECT_REF_FIELDS, identity="anonymous", properties_object_required=True),
    Event("Relationship Deleted", "object",
          "Removes the relationship between the person and the object properties.objectId "
          "(objectTypeId defaults to 1).",
          OBJECT_REF_FIELDS, ("objectId",), identity="user", properties_object_required=True),
    # Customer.io: message reporting
    Event("Report Delivery Event", "report",
          "Reports a delivery metric (delivered, opened, clicked, converted) for a message, "
          "typically an in-app message.",
          {"deliveryId": "string", "metric": enum("delivered", "clicked", "converted", "opened"),
           "recipient": "string", "reason": "string", "actionValue": "string",
           "href": "string"},
          properties_object_required=True),
    Event("Report Content Event", "report",
          "Reports views and clicks of anonymous in-app messages; Customer.io's JavaScript "
          "snippet sends it. The published schema requires properties.activityType while "
          "describing properties.actionType; we keep the published required list as is.",
          {"actionType": enum("viewed_content", "clicked_content"), "contentId": "integer",
           "templateId": "integer"},
          ("activityType",), properties_object_required=True),
]

CATEGORIES = ("ecommerce", "email", "mobile", "video", "live_chat", "people", "device",
              "object", "report", "ab_test")


def schema_name(event_name: str) -> str:
    return "event_" + re.sub(r"[^a-z0-9]+", "_", event_name.lower()).strip("_")


def event_schema(ev: Event) -> Schema:
    assert ev.category in CATEGORIES, ev
    required = ["event"]
    props: dict[str, Schema] = {"event": {"const": ev.name}}
    if ev.identity == "user":
        required.append("userId")
    elif ev.identity == "anonymous":
        required.append("anonymousId")
    # A required property implies the properties object: without it nothing is checked.
    if ev.properties_object_required or ev.required_properties:
        required.append("properties")
    properties_schema: Schema = {"type": "object"}
    if ev.required_properties:
        properties_schema["required"] = list(ev.required_properties)
    if ev.properties:
        properties_schema["properties"] = {k: s(v) for k, v in ev.properties.items()}
    props["properties"] = properties_schema
    if ev.device_token:
        required.append("context")
        props["context"] = obj(
            {"device": obj({"token": "id", "type": enum("ios", "android")},
                           required=("token",))},
            required=("device",),
        )
    if ev.context_traits:
        props["context"] = obj({"traits": obj(ev.context_traits)})
    own: Schema = {"type": "object", "required": required, "properties": props}
    if ev.identity == "either":
        # A semantic event is about a person: the group-only track shape does not apply.
        own["anyOf"] = IDENTITY_ANY_OF
    description = ev.description + (" " + ev.notes if ev.notes else "")
    return {
        "title": ev.name,
        "description": description,
        "x-cio-semantic-event": ev.name,
        "x-cio-category": ev.category,
        "allOf": [ref("track"), own],
    }


# ---------------------------------------------------------------------------------------------
# Call schemas
# ---------------------------------------------------------------------------------------------


def call_schema(call: str, description: str, own: dict[str, Schema],
                required: tuple[str, ...] = (), identity: bool = True) -> Schema:
    props: dict[str, Schema] = {"type": {"const": call}}
    props.update(own)
    props.update(COMMON_PROPERTIES)
    out: Schema = {"type": "object", "description": description}
    if required:
        out["required"] = list(required)
    if identity:
        out["anyOf"] = IDENTITY_ANY_OF
    out["properties"] = props
    return out


ID_PAIR = {"userId": ref("userId"), "anonymousId": ref("anonymousId")}


def components() -> Schema:
    schemas: dict[str, Schema] = {
        "userId": {"type": "string", "minLength": 1,
                   "description": "Your stable, unique identifier for a person."},
        "anonymousId": {"type": "string", "minLength": 1,
                        "description": "A stand-in identifier for a person you cannot name "
                                       "yet (for example a device or session UUID)."},
        "messageId": {"type": "string", "minLength": 1,
                      "description": "Unique per call; Customer.io uses it to drop "
                                     "duplicates, so a retry must reuse it."},
        "timestamp": {"type": "string", "format": "date-time",
                      "description": "When the call happened (RFC 3339); set it to backfill."},
        "sentAt": {"type": "string", "format": "date-time",
                   "description": "When the sender sent the call (RFC 3339)."},
        "originalTimestamp": {"type": "string", "format": "date-time",
                              "description": "The sender's clock when the call was made."},
        "context": CONTEXT,
        "integrations": INTEGRATIONS,
        "identify": call_schema(
            "identify",
            "Creates or updates a person and sets traits. Needs userId or anonymousId (both "
            "may be present). Customer.io accepts an email-only identify in some setups; "
            "cio-outbox does not: send the email as traits.email alongside an id.",
            {**ID_PAIR,
             "traits": obj({"email": "string", "createdAt": "date-time"},
                           description="Attributes of the person; any JSON values.")},
        ),
        "track": call_schema(
            "track",
            "Records an event a person performed. Needs userId or anonymousId. When event is "
            "a semantic event name, the message must also match that event's schema "
            "(x-cio-semantic-event). As Customer.io documents, a track may instead name a "
            "group (groupId without a person): an event performed by the group.",
            {**ID_PAIR, "groupId": ref("groupId"), "event": {"type": "string", "minLength": 1},
             "properties": obj({}, description="Event data; any JSON values.")},
            required=("event",),
        ),
        "page": call_schema(
            "page",
            "Records a web page view. Needs userId or anonymousId; name and category are "
            "optional.",
            {**ID_PAIR, "name": s("string"), "category": s("string"),
             "properties": obj({"category": "string", "url": "string", "title": "string",
                                "referrer": "string", "path": "string", "search": "string",
                                "keywords": ["string"]})},
        ),
        "screen": call_schema(
            "screen",
            "Records a mobile screen view. Needs userId or anonymousId; name and category "
            "are optional.",
            {**ID_PAIR, "name": s("string"), "category": s("string"),
             "properties": obj({})},
        ),
        "group": call_schema(
            "group",
            "Adds the person to a group (an object in Customer.io Journeys) and sets the "
            "group's traits. traits.object_type_id is the object type as a string of digits; "
            "Customer.io assumes \"1\" when it is missing.",
            {**ID_PAIR, "groupId": ref("groupId"),
             "traits": obj({"object_type_id": "string"},
                           description="Attributes of the group; any JSON values.")},
            required=("groupId",),
        ),
        "alias": call_schema(
            "alias",
            "Merges the profile previousId into the profile userId. Not accepted in /batch.",
            {"userId": ref("userId"), "previousId": ref("previousId")},
            required=("userId", "previousId"),
            identity=False,
        ),
        "groupId": {"type": "string", "minLength": 1, "description": "The group's identifier."},
        "previousId": {"type": "string", "minLength": 1,
                       "description": "The identifier being merged away."},
    }
    # Customer.io's third track shape: an event of a group, with groupId and no person.
    schemas["track"]["anyOf"] = [*IDENTITY_ANY_OF, {"required": ["groupId"]}]
    for call in ("identify", "track", "page", "screen", "group"):
        schemas[f"batch_{call}"] = {
            "description": f"A {call} message inside /batch: type is required.",
            "allOf": [ref(call), {"required": ["type"]}],
        }
    schemas["batch"] = {
        "type": "object",
        "description": (
            "Several identify, track, page, screen and group messages in one request, each "
            f"with its type. alias is not accepted here. At most {MAX_BATCH_BYTES} bytes per "
            f"request and {MAX_MESSAGE_BYTES} bytes per message (uncompressed JSON). context "
            "and integrations at this level apply to every message."
        ),
        "required": ["batch"],
        "properties": {
            "batch": {
                "type": "array",
                "items": {"anyOf": [ref(f"batch_{c}") for c in
                                    ("identify", "track", "page", "screen", "group")]},
            },
            "context": ref("context"),
            "integrations": ref("integrations"),
        },
    }
    schemas["error_body"] = {
        "type": "object",
        "description": "The body of an error response.",
        "properties": {
            "meta": obj({"errors": {"type": "array", "items": ref("error")}}),
        },
    }
    schemas["error"] = obj(
        {"field": "string", "reason": "string", "message": "string"},
        description="One problem: the offending field, a short reason and a sentence.",
    )
    schemas["ecommerce_product"] = obj(PRODUCT_FIELDS, description="A product in a list.")
    for ev in EVENTS:
        schemas[schema_name(ev.name)] = event_schema(ev)

    error_content = {"application/json": {"schema": ref("error_body")}}
    responses = {
        "Success": {
            "description": "Accepted. The body is an empty object. Customer.io also answers "
                           "200 to some requests it then drops (for example over the size "
                           "limits), so check sizes before sending.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "BadRequest": {"description": "The body is not valid JSON or breaks the schema.",
                       "content": error_content},
        "Unauthorized": {"description": "Missing or wrong API key, or a key for the other "
                                        "region.", "content": error_content},
        "PayloadTooLarge": {
            "description": f"Over {MAX_MESSAGE_BYTES} bytes per message or {MAX_BATCH_BYTES} "
                           "bytes per batch request (uncompressed).",
            "content": error_content,
        },
        "TooManyRequests": {
            "description": "Rate limited: wait as Retry-After says, then retry with the same "
                           "messageId.",
            "headers": {
                "Retry-After": {
                    "description": "How long to wait: delay-seconds or an HTTP-date "
                                   "(RFC 9110).",
                    "schema": {"anyOf": [{"type": "integer", "minimum": 0},
                                         {"type": "string"}]},
                }
            },
            "content": error_content,
        },
    }
    security_schemes = {
        "basicAuth": {
            "type": "http",
            "scheme": "basic",
            "description": "Legacy write keys: the API key is the username and the password "
                           "is empty (base64 of 'KEY:').",
        },
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "Keys that start with pk_ or sk_ followed by us_ or eu_; the "
                           "second part names the region whose server must be used.",
        },
    }
    return {"schemas": schemas, "responses": responses, "securitySchemes": security_schemes}


CALLS: dict[str, tuple[str, str]] = {
    "identify": ("People", "Create or update a person"),
    "track": ("Events", "Record an event (including semantic events)"),
    "page": ("Events", "Record a page view"),
    "screen": ("Events", "Record a screen view"),
    "group": ("Objects", "Relate a person to a group/object"),
    "alias": ("People", "Merge two profiles"),
    "batch": ("Batch", "Send several calls at once"),
}


def paths() -> Schema:
    out: Schema = {}
    for call, (tag, summary) in CALLS.items():
        limit = (f"At most {MAX_BATCH_BYTES} bytes per request and {MAX_MESSAGE_BYTES} per "
                 "message" if call == "batch" else f"At most {MAX_MESSAGE_BYTES} bytes")
        out[f"/{call}"] = {
            "post": {
                "operationId": call,
                "tags": [tag],
                "summary": summary,
                "description": f"{limit}, measured on the uncompressed JSON body.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref(call)}},
                },
                "responses": {
                    "200": {"$ref": "#/components/responses/Success"},
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "401": {"$ref": "#/components/responses/Unauthorized"},
                    "413": {"$ref": "#/components/responses/PayloadTooLarge"},
                    "429": {"$ref": "#/components/responses/TooManyRequests"},
                },
            }
        }
    return out


def build() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cio-outbox view of the Customer.io Data Pipelines API",
            "version": VERSION,
            "description": (
                "The calls cio-outbox sends to the Customer.io Data Pipelines API, with the "
                "semantic events Customer.io defines. Written by the cio-outbox project from "
                "Customer.io's published reference; where the two differ, Customer.io is "
                f"right. Limits: {MAX_MESSAGE_BYTES} bytes (32 KB) per call and "
                f"{MAX_BATCH_BYTES} bytes (500 KB) per batch request, measured on the "
                "uncompressed JSON body (see x-cio-limits)."
            ),
        },
        "servers": [
            {"url": "https://cdp.customer.io/v1", "description": "US region"},
            {"url": "https://cdp-eu.customer.io/v1", "description": "EU region"},
        ],
        "security": [{"basicAuth": []}, {"bearerAuth": []}],
        "x-cio-limits": {"maxMessageBytes": MAX_MESSAGE_BYTES, "maxBatchBytes": MAX_BATCH_BYTES},
        "tags": [{"name": t} for t in ("People", "Events", "Objects", "Batch")],
        "paths": paths(),
        "components": components(),
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run scripts/build_spec.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(EVENTS)} semantic events)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
