"""Where policies and pods come from: a local directory and lab, or the Kubernetes API."""
