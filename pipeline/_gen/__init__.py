"""Generated from proto/gadget_service.proto."""
