"""The engineers' client of a broker: its JSON API over HTTP (api), logging in at the OIDC provider
the broker names (login), the tokens and credentials kept per broker in the user's config
directory (state, session, credentials) and running a command with a credential (runner). It
never imports the broker's server side: it knows the broker only by its URL."""
