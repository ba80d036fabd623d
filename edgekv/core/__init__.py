"""The ground floor: errors, profiles, the manifest, file hashing and shared constants. It imports
nothing of edgekv above it."""
