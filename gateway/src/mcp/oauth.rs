//! OAuth-aware refusals: a 401 names the protected resource metadata (RFC 9728) that says
//! how to get a credential.

use super::*;

/// This gateway's base URL as the client reached it (`Host`), or None when the header is not a
/// plain host\[:port\].
pub(super) fn base_url(gateway: &Gateway, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(axum::http::header::HOST)?.to_str().ok()?;
    let plain = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    // A cluster gateway serves TLS; a standalone one plain HTTP on loopback.
    let scheme = match gateway.policies {
        crate::Policies::Cluster(_) => "https",
        crate::Policies::Dir(_) => "http",
    };
    plain.then(|| format!("{scheme}://{host}"))
}

/// `WWW-Authenticate` for a request without a usable credential: a Bearer challenge naming the
/// protected resource metadata (RFC 9728), where an OAuth-aware client reads how to get one.
pub(super) fn challenge(
    gateway: &Gateway,
    headers: &HeaderMap,
    upstream: &str,
) -> Option<HeaderValue> {
    let base = base_url(gateway, headers)?;
    let named = !upstream.is_empty()
        && upstream.len() <= 63
        && upstream
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let path = if named {
        format!("/.well-known/oauth-protected-resource/mcp/{upstream}")
    } else {
        "/.well-known/oauth-protected-resource".to_owned()
    };
    HeaderValue::from_str(&format!(
        "Bearer realm=\"tollgate\", resource_metadata=\"{base}{path}\""
    ))
    .ok()
}

/// `GET /.well-known/oauth-protected-resource[/mcp/{upstream}]`: the protected resource metadata
/// (RFC 9728) of the MCP proxy. Tollgate is no authorization server and names none: its
/// credentials are the agent's own (in a cluster a projected ServiceAccount token for the
/// audience `tollgate`; standalone an API key from the gateway's keys file), said in words for
/// the person reading a client's error.
pub(crate) async fn resource_metadata(
    State(gateway): State<Arc<Gateway>>,
    upstream: Option<Path<String>>,
    headers: HeaderMap,
) -> Response {
    let base = base_url(&gateway, &headers).unwrap_or_default();
    let resource = match &upstream {
        Some(Path(upstream)) => format!("{base}/mcp/{upstream}"),
        None => format!("{base}/mcp"),
    };
    let how = match gateway.policies {
        crate::Policies::Cluster(_) => {
            "a projected ServiceAccount token of the agent's pod for the audience `tollgate` \
             (the AgentIdentity's serviceAccount.tokenAudience), as a Bearer token"
        }
        crate::Policies::Dir(_) => "an API key from the gateway's keys file, as a Bearer token",
    };
    axum::Json(json!({
        "resource": resource,
        "authorization_servers": [],
        "bearer_methods_supported": ["header"],
        "resource_name": "Tollgate MCP gateway",
        "resource_documentation": "https://github.com/tollgate-dev/tollgate/blob/main/docs/gateway.md#mcp-proxy",
        "tollgate_credentials": how,
    }))
    .into_response()
}
