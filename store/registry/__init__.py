"""The registry client and its parts: auth, credentials, retry, errors and blob ranges."""
