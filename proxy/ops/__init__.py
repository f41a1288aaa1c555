"""The gateway's own routes and the operator's commands: route table, billing, admin, model list."""
