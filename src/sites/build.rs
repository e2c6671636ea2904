//! Sites from the config, every mistake located by file, line and key.

use super::{is_matrix_path, Action, PathMatch, Site, SiteRoute, Sites, MATRIX_SITE};
use crate::config::sites::SiteRouteConfig;
use crate::config::{ConfigError, EdgeConfig, Seg, Source};
use crate::local::redirect::Redirect;
use crate::local::static_files::StaticRoot;
use crate::upstream::named::NamedUpstreams;
use http::{HeaderName, HeaderValue};
use std::collections::HashMap;
use std::path::Path;

impl Sites {
    pub fn from_config(config: &EdgeConfig, source: &Source, upstreams: &NamedUpstreams) -> Result<Sites, ConfigError> {
        let base = source.file.parent().unwrap_or(Path::new("."));
        let mut sites = Vec::with_capacity(config.sites.len() + 1);
        let mut exact: HashMap<Box<str>, usize> = HashMap::new();
        let mut wildcard: HashMap<Box<str>, usize> = HashMap::new();
        let mut claim = |name: &str, site: usize, at: &[Seg]| -> Result<(), ConfigError> {
            let (map, key) = match name.strip_prefix("*.") {
                Some(parent) => (&mut wildcard, parent),
                None => (&mut exact, name),
            };
            if let Some(&other) = map.get(key) {
                if other != site {
                    let owner = if other == MATRIX_SITE {
                        "the Matrix site".to_string()
                    } else {
                        format!("sites[{}]", other - 1)
                    };
                    return Err(source.error_at(at, format!("{name} is already answered by {owner}")));
                }
            }
            map.insert(key.into(), site);
            Ok(())
        };

        let matrix_at = [Seg::Key("matrix_site"), Seg::Key("hosts")];
        let matrix_hosts: Vec<String> = match &config.matrix_site.hosts {
            Some(hosts) => hosts.iter().map(|h| h.0.clone()).collect(),
            None => default_matrix_hosts(config),
        };
        if !config.sites.is_empty() {
            for name in &matrix_hosts {
                claim(name, MATRIX_SITE, &matrix_at)?;
            }
        }
        let routes =
            build_routes(&config.matrix_site.routes, &[Seg::Key("matrix_site")], true, base, source, upstreams)?;
        sites.push(Site { hosts: matrix_hosts, routes });

        for (index, site) in config.sites.iter().enumerate() {
            let at = |key| [Seg::Key("sites"), Seg::Index(index), Seg::Key(key)];
            if site.hosts.is_empty() {
                return Err(source.error_at(&at("hosts"), "list at least one host"));
            }
            for (host_index, host) in site.hosts.iter().enumerate() {
                let host_at = [Seg::Key("sites"), Seg::Index(index), Seg::Key("hosts"), Seg::Index(host_index)];
                claim(&host.0, index + 1, &host_at)?;
            }
            if site.routes.is_empty() {
                return Err(source.error_at(&at("routes"), "list at least one route"));
            }
            let prefix = [Seg::Key("sites"), Seg::Index(index)];
            let routes = build_routes(&site.routes, &prefix, false, base, source, upstreams)?;
            sites.push(Site { hosts: site.hosts.iter().map(|h| h.0.clone()).collect(), routes });
        }
        let listens_for_sites = config.listeners.iter().any(|l| l.serves.contains(&crate::config::Role::Sites));
        if !config.sites.is_empty() && !listens_for_sites {
            return Err(source.error_at(
                &[Seg::Key("sites")],
                "sites are configured but no listener serves them: add `sites` to a listener's `serves`",
            ));
        }
        Ok(Sites { sites, exact, wildcard, matrix_answers_every_host: config.sites.is_empty() })
    }
}

/// `server_name`, the `m.server` host and the client homeserver's host.
fn default_matrix_hosts(config: &EdgeConfig) -> Vec<String> {
    let mut hosts = vec![host_only(&config.server_name.0)];
    if let Some(server) = &config.well_known.server {
        hosts.push(server.host.to_ascii_lowercase());
    }
    if let Some(client) = &config.well_known.client {
        let url = &client.homeserver.0;
        let authority = url.split("://").nth(1).unwrap_or(url).split(['/', '?', '#']).next().unwrap_or("");
        hosts.push(host_only(authority));
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

fn host_only(authority: &str) -> String {
    let lowered = authority.to_ascii_lowercase();
    if lowered.starts_with('[') {
        return lowered.split_inclusive(']').next().unwrap_or(&lowered).to_string();
    }
    lowered.rsplit_once(':').map_or(lowered.clone(), |(host, _)| host.to_string())
}

/// A route's `set_headers` and `remove_headers`, checked as HTTP names and values.
type HeaderChanges = (Vec<(HeaderName, HeaderValue)>, Vec<HeaderName>);

fn header_changes(
    route: &SiteRouteConfig,
    error: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<HeaderChanges, ConfigError> {
    let mut set_headers = Vec::with_capacity(route.set_headers.len());
    for (name, value) in &route.set_headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| error("set_headers", format!("{name:?} is not a header name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| error("set_headers", format!("{value:?} is not a header value")))?;
        set_headers.push((name, value));
    }
    let mut remove_headers = Vec::with_capacity(route.remove_headers.len());
    for name in &route.remove_headers {
        remove_headers.push(
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| error("remove_headers", format!("{name:?} is not a header name")))?,
        );
    }
    Ok((set_headers, remove_headers))
}

fn build_routes(
    configs: &[SiteRouteConfig],
    prefix: &[Seg],
    matrix_site: bool,
    base: &Path,
    source: &Source,
    upstreams: &NamedUpstreams,
) -> Result<Vec<SiteRoute>, ConfigError> {
    let mut routes: Vec<SiteRoute> = Vec::with_capacity(configs.len());
    for (index, route) in configs.iter().enumerate() {
        let at = |key: &'static str| {
            let mut path = prefix.to_vec();
            path.extend([Seg::Key("routes"), Seg::Index(index)]);
            if !key.is_empty() {
                path.push(Seg::Key(key));
            }
            path
        };
        let error = |key, message: String| source.error_at(&at(key), message);
        let matcher = match (&route.path, &route.prefix) {
            (Some(path), None) => PathMatch::Exact(path.clone()),
            (None, Some(prefix)) => PathMatch::Prefix(prefix.clone()),
            _ => return Err(error("", "give exactly one of `path` (exact) or `prefix`".into())),
        };
        let (key, text) = match &matcher {
            PathMatch::Exact(p) => ("path", p),
            PathMatch::Prefix(p) => ("prefix", p),
        };
        if !text.starts_with('/') || text.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(error(key, format!("{text:?} must start with / and hold no spaces")));
        }
        if matrix_site && is_matrix_path(text.as_bytes()) {
            return Err(error(
                key,
                format!("{text} is a Matrix path: the Matrix site sends /_matrix, /_synapse and /.well-known/matrix by Synapse's table"),
            ));
        }
        if routes.iter().any(|r| r.matcher == matcher) {
            return Err(error(key, format!("{text} is routed twice in this site")));
        }
        let action = match (&route.upstream, &route.redirect, &route.static_files) {
            (Some(name), None, None) => match upstreams.id(name) {
                Some(id) => Action::Upstream(id),
                None => return Err(error("upstream", format!("no upstream named {name:?} under `upstreams`"))),
            },
            (None, Some(redirect), None) => Action::Redirect(
                Redirect::new(&redirect.to.0, redirect.status, redirect.keep_path)
                    .map_err(|e| error("redirect", e.to_string()))?,
            ),
            (None, None, Some(files)) => Action::Static(StaticRoot::from_config(files, base).map_err(|(key, e)| {
                let mut path = at("static");
                path.push(Seg::Key(key));
                source.error_at(&path, e)
            })?),
            _ => return Err(error("", "give exactly one of `upstream`, `redirect` or `static`".into())),
        };
        let is_upstream = matches!(action, Action::Upstream(_));
        if route.strip_prefix && !matches!(matcher, PathMatch::Prefix(_)) {
            return Err(error("strip_prefix", "only a `prefix` route can strip its prefix".into()));
        }
        if route.websocket && !is_upstream {
            return Err(error("websocket", "WebSockets go to an upstream: add `upstream`".into()));
        }
        if route.websocket && route.websocket_idle_timeout.0.is_zero() {
            return Err(error("websocket_idle_timeout", "must be longer than 0s".into()));
        }
        if !is_upstream && (!route.set_headers.is_empty() || !route.remove_headers.is_empty()) {
            return Err(error("set_headers", "request headers can only be changed on the way to an upstream".into()));
        }
        let (set_headers, remove_headers) = header_changes(route, &error)?;
        let position = crate::config::render_path(&at(""));
        routes.push(SiteRoute {
            matcher,
            action,
            allow: route.allow.as_ref().map(|list| list.iter().map(|c| c.0).collect()),
            websocket_idle: route.websocket.then_some(route.websocket_idle_timeout.0),
            strip_prefix: route.strip_prefix,
            set_headers,
            remove_headers,
            position,
        });
    }
    // Exact paths first (file order), then prefixes, longest first.
    routes.sort_by_key(|route| match &route.matcher {
        PathMatch::Exact(_) => (0, 0),
        PathMatch::Prefix(prefix) => (1, usize::MAX - prefix.len()),
    });
    Ok(routes)
}
