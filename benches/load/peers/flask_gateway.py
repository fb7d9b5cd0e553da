"""The seed's §3.2 Flask gateway prototype, as written there, as a benchmark
peer. Only the backend address is configurable (BACKEND_URL), since the seed
hard-codes localhost:5001. Run under gunicorn: flask_gateway:app
"""
import os

import requests
from flask import Flask, jsonify, request

app = Flask(__name__)
BACKEND_URL = os.environ.get("BACKEND_URL", "http://localhost:5001")


@app.route('/api/<path:endpoint>', methods=['GET', 'POST'])
def gateway_proxy(endpoint):
    backend_url = f"{BACKEND_URL}/{endpoint}"
    try:
        if request.method == 'GET':
            resp = requests.get(backend_url, params=request.args)
        elif request.method == 'POST':
            resp = requests.post(backend_url, json=request.json)
        return jsonify(resp.json()), resp.status_code
    except requests.exceptions.ConnectionError:
        return jsonify({"error": "Service unavailable"}), 503
