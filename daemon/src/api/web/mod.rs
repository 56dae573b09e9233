//! The web page at `/`: a chat (streamed from `/v1/chat/completions`) and the cluster
//! panel (polled from `/v1/cluster`), as plain HTML, CSS and JavaScript embedded in
//! the binary: no build step, nothing fetched from elsewhere at run time. `[api] web =
//! false` turns it off (then `/` is 404 like any unknown path).
//!
//! The files are served with `Cache-Control: no-cache` and an `ETag` (a hash of the
//! file): a browser revalidates on each load and gets `304 Not Modified` until the
//! binary changes.

use std::sync::OnceLock;

use hyper::header::{
    HeaderMap, HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_SECURITY_POLICY, ETAG, IF_NONE_MATCH,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Method, StatusCode};

use super::{text_response, ApiResponse};

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: [Asset; 3] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("app.js"),
    },
    Asset {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("style.css"),
    },
];

/// Only this origin's own files and API; no inline script or style.
const CSP: &str =
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'";

/// Whether `path` is one of the page's files.
pub fn is_page(path: &str) -> bool {
    ASSETS.iter().any(|a| a.path == path)
}

/// The entity tag of each asset, in `ASSETS` order: a quoted hash of its bytes.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let hash = blake3::hash(a.body).to_hex();
                format!("\"{}\"", &hash[..16])
            })
            .collect()
    })
}

/// Whether an `If-None-Match` header names `etag` (or `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

/// `GET` of one of the page's files (`path` as [`is_page`] accepted it).
pub fn serve(path: &str, method: &Method, headers: &HeaderMap) -> ApiResponse {
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return text_response(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    };
    if method != Method::GET {
        let mut r = text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed; use GET\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let asset = &ASSETS[i];
    let etag = &etags()[i];
    let mut r = if not_modified(headers, etag) {
        let mut r = text_response(StatusCode::NOT_MODIFIED, asset.content_type, "");
        r.headers_mut().remove(hyper::header::CONTENT_TYPE);
        r
    } else {
        text_response(StatusCode::OK, asset.content_type, asset.body)
    };
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(ETAG, v);
    }
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if asset.path == "/" {
        h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, if_none_match: Option<&str>) -> ApiResponse {
        let mut h = HeaderMap::new();
        if let Some(t) = if_none_match {
            h.insert(IF_NONE_MATCH, HeaderValue::from_str(t).expect("header"));
        }
        serve(path, &Method::GET, &h)
    }

    #[test]
    fn files_have_their_types_and_revalidate_by_etag() {
        for (path, ty) in [
            ("/", "text/html; charset=utf-8"),
            ("/app.js", "text/javascript; charset=utf-8"),
            ("/style.css", "text/css; charset=utf-8"),
        ] {
            let r = get(path, None);
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers();
            assert_eq!(h[hyper::header::CONTENT_TYPE], ty, "{path}");
            assert_eq!(h[CACHE_CONTROL], "no-cache", "{path}");
            let etag = h[ETAG].to_str().expect("etag").to_string();
            assert_eq!(etag.len(), 18, "{etag}");
            assert_eq!(get(path, Some(&etag)).status(), StatusCode::NOT_MODIFIED);
            let list = format!("\"x\", W/{etag}");
            assert_eq!(get(path, Some(&list)).status(), StatusCode::NOT_MODIFIED);
            assert_eq!(get(path, Some("\"other\"")).status(), StatusCode::OK);
        }
        let tags = etags();
        assert!(tags[0] != tags[1] && tags[1] != tags[2]);
    }

    #[test]
    fn only_get_and_only_the_page_files() {
        assert!(is_page("/") && is_page("/app.js") && is_page("/style.css"));
        assert!(!is_page("/index.html") && !is_page("/app.js/") && !is_page("/v1/models"));
        let r = serve("/", &Method::POST, &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET");
    }

    #[test]
    fn the_page_names_only_its_own_files() {
        let html = std::str::from_utf8(ASSETS[0].body).expect("utf-8");
        for a in &ASSETS[1..] {
            assert!(html.contains(&format!("\"{}\"", a.path)), "{}", a.path);
        }
        for a in &ASSETS {
            let text = std::str::from_utf8(a.body).expect("utf-8");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{}",
                a.path
            );
        }
    }
}
