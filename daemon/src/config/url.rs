//! nng TCP URLs (`tcp://HOST:PORT`) of the cluster's data and control planes.

use std::net::Ipv6Addr;

use super::CONTROL_PORT_OFFSET;

/// The control-plane URL of a data-plane nng URL: the same host, port + 1.
pub fn control_url(data_url: &str) -> Result<String, String> {
    let (host, port) = parse_tcp_url(data_url)?;
    Ok(format!("tcp://{host}:{}", port + CONTROL_PORT_OFFSET))
}

/// Splits an nng TCP URL (`tcp://HOST:PORT`) into its host (an IPv6 address keeps its
/// brackets) and port, checking that the port leaves room for the control plane.
pub fn parse_tcp_url(url: &str) -> Result<(&str, u16), String> {
    const EXAMPLE: &str = "such as tcp://192.168.1.20:5555";
    let Some(rest) = url.strip_prefix("tcp://") else {
        return Err(format!(
            "'{url}' is not an nng TCP URL {EXAMPLE}: it must start with tcp://"
        ));
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("'{url}' has no port ({EXAMPLE})"));
    };
    if host.is_empty() {
        return Err(format!("'{url}' has no host ({EXAMPLE})"));
    }
    let host_ok = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok()),
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'),
    };
    if !host_ok {
        return Err(format!(
            "'{url}': '{host}' is not a host name or an IP address \
             (an IPv6 address goes in brackets, such as tcp://[fd00::20]:5555)"
        ));
    }
    let max = u16::MAX - CONTROL_PORT_OFFSET;
    match port.parse::<u16>() {
        Ok(port) if (1..=max).contains(&port) => Ok((host, port)),
        Ok(port) => Err(format!(
            "'{url}': the port must be in 1..={max} (the control plane listens on the \
             port + {CONTROL_PORT_OFFSET}), got {port}"
        )),
        Err(_) => Err(format!(
            "'{url}': '{port}' is not a port number ({EXAMPLE})"
        )),
    }
}
