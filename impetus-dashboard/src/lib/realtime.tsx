// One Socket.IO connection for the whole app: connection state, the metrics history and the recent
// requests live here so they survive page changes. socket.io-client reconnects by itself after a
// dropped connection; a refused key is asked for again through the shared prompt.
import { createContext, useContext, useEffect, useRef, useState, type ReactNode } from "react";
import { io, type Socket } from "socket.io-client";
import { endpoints } from "../api/endpoints";
import { authRequired, getApiKey, onKeyChange } from "./api";
import { appendBounded, applyRequestEvent, meanTtft, sampleFromMetrics, type RequestRecord, type Sample } from "./metrics";
import type { HardwareReport } from "./types";

export type ConnectionState = "connecting" | "connected" | "reconnecting" | "offline" | "unauthorized";

export const HISTORY = 120; // samples kept for the charts: two minutes at one a second
export const REQUESTS_KEPT = 200;
export const ROOMS = ["metrics", "requests", "models"]; // hardware comes with "metrics"

type Handler = (payload: unknown) => void;

interface Realtime {
  state: ConnectionState;
  samples: Sample[];
  requests: RequestRecord[];
  /** The latest `hardware` event: the /api/hardware report (with the server's `timestamp`). */
  hardware: HardwareReport | null;
  lastEventAt: number | null;
  on: (event: string, handler: Handler) => () => void;
}

const RealtimeContext = createContext<Realtime>({
  state: "connecting",
  samples: [],
  requests: [],
  hardware: null,
  lastEventAt: null,
  on: () => () => undefined,
});

export function useRealtime(): Realtime {
  return useContext(RealtimeContext);
}

/** Subscribe a component to one Socket.IO event for as long as it is mounted. */
export function useRealtimeEvent(event: string, handler: Handler): void {
  const { on } = useRealtime();
  const ref = useRef(handler);
  ref.current = handler;
  useEffect(() => on(event, (payload) => ref.current(payload)), [on, event]);
}

/** The handshake's query: the API key, when there is one. */
export function keyQuery(): Record<string, string> {
  const key = getApiKey();
  return key ? { api_key: key } : {};
}

/** Whether a connect error means the key is missing or wrong: a 401 on the handshake (the
 * transport error's description is the HTTP status), or a refusal that says so. */
export function isAuthError(error: Error & { description?: unknown }): boolean {
  return error.description === 401 || /unauthori[sz]ed|api key|invalid_api_key|401/i.test(error.message);
}

export function RealtimeProvider({ children, url }: { children: ReactNode; url?: string }) {
  const [state, setState] = useState<ConnectionState>("connecting");
  const [samples, setSamples] = useState<Sample[]>([]);
  const [requests, setRequests] = useState<RequestRecord[]>([]);
  const [hardware, setHardware] = useState<HardwareReport | null>(null);
  const [lastEventAt, setLastEventAt] = useState<number | null>(null);
  const handlers = useRef(new Map<string, Set<Handler>>());
  const requestsRef = useRef<RequestRecord[]>([]);
  const [on] = useState(() => (event: string, handler: Handler) => {
    const set = handlers.current.get(event) ?? new Set<Handler>();
    set.add(handler);
    handlers.current.set(event, set);
    return () => {
      set.delete(handler);
    };
  });

  useEffect(() => {
    const socket: Socket = io(url ?? "/", {
      path: endpoints.socketio,
      // Polling first, then the upgrade to a WebSocket: a refused handshake (401 without the key) is
      // then an HTTP answer whose status the page can read; a refused WebSocket shows no status.
      transports: ["polling", "websocket"],
      // The server asks for the key in the Engine.IO handshake, before a session exists, and a
      // browser cannot set headers on a WebSocket: so it goes in the query (as Jupyter's ?token=).
      query: keyQuery(),
      // Sent again on every reconnection: the rooms to join, and the key when there is one.
      auth: (cb) => {
        const key = getApiKey();
        cb(key ? { rooms: ROOMS, api_key: key } : { rooms: ROOMS });
      },
      reconnectionDelay: 500,
      reconnectionDelayMax: 5000,
    });
    const dispatch = (event: string, payload: unknown) => {
      handlers.current.get(event)?.forEach((fn) => fn(payload));
    };

    socket.on("connect", () => setState("connected"));
    socket.on("disconnect", (reason) => {
      // The server closed it, or the network went: socket.io-client reconnects by itself, except
      // after a server-side disconnect, where we ask it to.
      setState("reconnecting");
      if (reason === "io server disconnect") socket.connect();
    });
    socket.on("connect_error", (error) => {
      if (isAuthError(error)) {
        setState("unauthorized");
        authRequired(getApiKey() ? "The key was refused for the live feed." : "This server needs an API key.");
      } else {
        setState(socket.active ? "reconnecting" : "offline");
      }
    });
    socket.io.on("reconnect_attempt", () => {
      socket.io.opts.query = keyQuery(); // the key may have changed since the last attempt
      setState((s) => (s === "unauthorized" ? s : "reconnecting"));
    });
    socket.io.on("reconnect_failed", () => setState("offline"));

    socket.on("metrics", (payload: unknown) => {
      const now = Date.now();
      const sample = sampleFromMetrics(payload, now);
      if (sample.ttftMs === null) {
        // The metrics event has no TTFT: take the mean of the requests that finished since the last sample.
        sample.ttftMs = meanTtft(requestsRef.current, now - 1000, now);
      }
      setSamples((list) => appendBounded(list, sample, HISTORY));
      setLastEventAt(now);
      dispatch("metrics", payload);
    });
    socket.on("request_event", (payload: unknown) => {
      requestsRef.current = applyRequestEvent(requestsRef.current, payload, REQUESTS_KEPT);
      setRequests(requestsRef.current);
      dispatch("request_event", payload);
    });
    socket.on("hardware", (payload: unknown) => {
      setHardware(payload as HardwareReport);
      dispatch("hardware", payload);
    });
    for (const event of ["model_event", "pull_progress"]) {
      socket.on(event, (payload: unknown) => dispatch(event, payload));
    }

    // A new key: connect again with it (a refused connection does not retry by itself).
    const offKey = onKeyChange(() => {
      socket.disconnect();
      setState("connecting");
      socket.io.opts.query = keyQuery();
      socket.connect();
    });
    return () => {
      offKey();
      socket.removeAllListeners();
      socket.io.removeAllListeners();
      socket.disconnect();
    };
  }, [url]);

  return (
    <RealtimeContext.Provider value={{ state, samples, requests, hardware, lastEventAt, on }}>
      {children}
    </RealtimeContext.Provider>
  );
}
