// The official TypeScript MCP SDK as a client of the gateway, OAuth included.
//
//   node tests/interop/ts_client.mjs MCP_URL
//   node tests/interop/ts_client.mjs MCP_URL tools TOOL [ARGUMENTS_JSON]
//
// The SDK's own auth code does discovery, registration, PKCE, the code exchange and the
// reactive refresh; this script only supplies an in-memory OAuthClientProvider. Protocol on
// stdout, one JSON object per line:
//   {"authorize": URL}      the SDK wants the user agent sent there; the driver (the pytest
//                           test) answers with one stdin line: the authorization code
//   {"authorized": {...}}   after transport.finishAuth(code)
//   {"tools": [...]}, {"echo": ...}, {"count": ..., "progress": [...]}, {"fail": {...}},
//   {"resource": ...}, {"prompt": ...}, {"refreshed": true, ...}, then {"done": true}
//   {"error": MESSAGE}      anything failed (exit status 1)
// The "tools" mode (tool policy, issue 10), after the same authorization: {"tools": [...]},
// then a call of TOOL: {"called": TEXT} or, when the gateway answers with a JSON-RPC
// error, {"refused": {"code": N, "message": M}}; then {"done": true}.
// The "bearer" mode (connected accounts, issue 11): `node ts_client.mjs MCP_URL bearer TOKEN TOOL`
// uses a gateway access token obtained elsewhere (no OAuth here): {"tools": [...]}, then a call
// of TOOL: {"called": TEXT, "isError": BOOL}, or {"refused": {"code": N, "message": M}} when the
// gateway answers with a JSON-RPC error; then {"done": true}.
// Driven by tests/test_interop_typescript.py (and tests/test_upstream_auth_typescript.py).

import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';

import { UnauthorizedError } from '@modelcontextprotocol/sdk/client/auth.js';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { McpError } from '@modelcontextprotocol/sdk/types.js';

const REDIRECT_URI = 'http://127.0.0.1:53683/callback';

function emit(object) {
    process.stdout.write(JSON.stringify(object) + '\n');
}

function fail(error) {
    const message = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
    emit({ error: message });
    if (error instanceof Error && error.stack) process.stderr.write(error.stack + '\n');
    process.exit(1);
}

process.on('unhandledRejection', fail);

const stdinLines = createInterface({ input: process.stdin, terminal: false })[Symbol.asyncIterator]();

async function readLine() {
    const { value, done } = await stdinLines.next();
    if (done) throw new Error('stdin closed before the authorization code arrived');
    return value.trim();
}

/** The SDK's OAuthClientProvider, everything kept in memory. */
class InMemoryOAuthProvider {
    constructor() {
        this._clientInformation = undefined;
        this._tokens = undefined;
        this._codeVerifier = undefined;
        this.redirects = [];
        this.savedTokens = [];
        this.invalidated = [];
    }

    get redirectUrl() {
        return REDIRECT_URI;
    }

    get clientMetadata() {
        return {
            redirect_uris: [REDIRECT_URI],
            client_name: 'TypeScript SDK interop test',
            grant_types: ['authorization_code', 'refresh_token'],
            response_types: ['code'],
            token_endpoint_auth_method: 'none',
        };
    }

    state() {
        return randomBytes(16).toString('hex');
    }

    clientInformation() {
        return this._clientInformation;
    }

    saveClientInformation(clientInformation) {
        this._clientInformation = clientInformation; // kept unchanged, `issuer` included
    }

    tokens() {
        return this._tokens;
    }

    saveTokens(tokens) {
        this._tokens = tokens; // kept unchanged, `issuer` included
        this.savedTokens.push(tokens);
    }

    redirectToAuthorization(authorizationUrl) {
        this.redirects.push(String(authorizationUrl));
        emit({ authorize: String(authorizationUrl) });
    }

    saveCodeVerifier(codeVerifier) {
        this._codeVerifier = codeVerifier;
    }

    codeVerifier() {
        if (!this._codeVerifier) throw new Error('no PKCE code verifier saved');
        return this._codeVerifier;
    }

    invalidateCredentials(scope) {
        this.invalidated.push(scope);
        if (scope === 'all' || scope === 'client') this._clientInformation = undefined;
        if (scope === 'all' || scope === 'tokens') this._tokens = undefined;
        if (scope === 'all' || scope === 'verifier') this._codeVerifier = undefined;
    }
}

function newClient() {
    return new Client({ name: 'mcp-gateway-ts-interop', version: '1.0.0' }, { capabilities: {} });
}

function textOf(content) {
    return content.filter((part) => part.type === 'text').map((part) => part.text).join('');
}

/** The tool policy as this SDK sees it: what is listed, and whether a call is refused. */
async function toolsMode(client, name, args) {
    if (!name) throw new Error('usage: node ts_client.mjs MCP_URL tools TOOL [ARGUMENTS_JSON]');
    const listed = await client.listTools();
    emit({ tools: listed.tools.map((tool) => tool.name) });
    try {
        const result = await client.callTool({ name, arguments: args });
        emit({ called: textOf(result.content), isError: result.isError === true });
    } catch (error) {
        if (!(error instanceof McpError)) throw error;
        emit({ refused: { code: error.code, message: error.message } });
    }
}

/** With a gateway access token given on the command line: list the tools, call one. */
async function bearerMode(serverUrl, token, name) {
    if (!token || !name) throw new Error('usage: node ts_client.mjs MCP_URL bearer TOKEN TOOL');
    const transport = new StreamableHTTPClientTransport(serverUrl, {
        requestInit: { headers: { Authorization: `Bearer ${token}` } },
    });
    const client = newClient();
    try {
        await client.connect(transport);
        const listed = await client.listTools();
        emit({ tools: listed.tools.map((tool) => tool.name) });
        const result = await client.callTool({ name, arguments: {} });
        emit({ called: textOf(result.content), isError: result.isError === true });
    } catch (error) {
        if (!(error instanceof McpError)) throw error; // e.g. no connected account: the link
        emit({ refused: { code: error.code, message: error.message } });
    }
    await client.close();
    emit({ done: true });
}

async function main() {
    const url = process.argv[2];
    if (!url) throw new Error('usage: node ts_client.mjs MCP_URL');
    const serverUrl = new URL(url);
    if (process.argv[3] === 'bearer') return bearerMode(serverUrl, process.argv[4], process.argv[5]);
    const provider = new InMemoryOAuthProvider();

    // First attempt: 401, discovery, registration, then redirectToAuthorization.
    const first = new StreamableHTTPClientTransport(serverUrl, { authProvider: provider });
    try {
        await newClient().connect(first);
        throw new Error('the gateway let an unauthenticated client connect');
    } catch (error) {
        if (!(error instanceof UnauthorizedError)) throw error;
    }
    if (provider.redirects.length !== 1) {
        throw new Error(`expected one authorization redirect, got ${provider.redirects.length}`);
    }
    const code = await readLine();
    await first.finishAuth(code);
    const granted = provider.tokens();
    emit({
        authorized: {
            token_type: granted?.token_type,
            scope: granted?.scope,
            has_refresh_token: Boolean(granted?.refresh_token),
            client_id: provider.clientInformation()?.client_id,
        },
    });
    await first.close();

    // Reconnect with the tokens the SDK now holds.
    const transport = new StreamableHTTPClientTransport(serverUrl, { authProvider: provider });
    const client = newClient();
    await client.connect(transport);

    if (process.argv[3] === 'tools') {
        await toolsMode(client, process.argv[4], JSON.parse(process.argv[5] ?? '{}'));
        await client.close();
        emit({ done: true });
        return;
    }

    const tools = await client.listTools();
    emit({ tools: tools.tools.map((tool) => tool.name) });

    const echo = await client.callTool({ name: 'echo', arguments: { text: 'hi' } });
    emit({ echo: textOf(echo.content) });

    const progress = [];
    const count = await client.callTool({ name: 'count', arguments: { steps: 3 } }, undefined, {
        onprogress: (notification) => progress.push(notification.progress),
    });
    emit({ count: textOf(count.content), progress });

    const failed = await client.callTool({ name: 'fail', arguments: {} });
    emit({ fail: { isError: failed.isError === true, text: textOf(failed.content) } });

    const resource = await client.readResource({ uri: 'memo://greeting' });
    emit({ resource: resource.contents[0]?.text });

    const prompt = await client.getPrompt({ name: 'review', arguments: { code: 'x' } });
    const message = prompt.messages[0]?.content;
    emit({ prompt: message?.type === 'text' ? message.text : JSON.stringify(message) });

    // Reactive refresh: the gateway rejects a garbage access token with 401; the SDK must
    // refresh with the refresh token it holds and retry, without a new authorization.
    const before = provider.tokens();
    if (!before?.refresh_token) throw new Error('the SDK holds no refresh token');
    provider._tokens = { ...before, access_token: 'garbage-' + randomBytes(8).toString('hex') };
    const savesBefore = provider.savedTokens.length;
    const again = await client.listTools();
    const after = provider.tokens();
    const refreshed =
        provider.redirects.length === 1 &&
        provider.savedTokens.length === savesBefore + 1 &&
        Boolean(after?.access_token) &&
        !after.access_token.startsWith('garbage-') &&
        after.access_token !== before.access_token;
    if (!refreshed) {
        throw new Error(
            `no reactive refresh: redirects=${provider.redirects.length} saves=${provider.savedTokens.length - savesBefore} ` +
                `invalidated=${JSON.stringify(provider.invalidated)}`,
        );
    }
    emit({
        refreshed: true,
        tools_after_refresh: again.tools.length,
        refresh_token_rotated: after.refresh_token !== before.refresh_token,
        has_refresh_token: Boolean(after.refresh_token),
        invalidated: provider.invalidated,
    });

    await client.close();
    emit({ done: true });
}

main().then(
    () => process.exit(0),
    (error) => fail(error),
);
