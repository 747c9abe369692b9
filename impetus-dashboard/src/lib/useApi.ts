import { useCallback, useEffect, useRef, useState } from "react";
import { ApiError, apiJson, onKeyChange } from "./api";

export interface ApiState<T> {
  data: T | null;
  error: ApiError | Error | null;
  loading: boolean;
  /** The endpoint answered 404/405: it does not exist on this server (yet). */
  missing: boolean;
  reload: () => void;
}

/** GET `path` as JSON on mount, when the key changes, on reload(), and every `intervalMs` if given. */
export function useApi<T>(path: string | null, intervalMs?: number): ApiState<T> {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<ApiError | Error | null>(null);
  const [loading, setLoading] = useState(path !== null);
  const [tick, setTick] = useState(0);
  const alive = useRef(true);
  const reload = useCallback(() => setTick((t) => t + 1), []);

  useEffect(() => {
    alive.current = true;
    const off = onKeyChange(reload);
    return () => {
      alive.current = false;
      off();
    };
  }, [reload]);

  useEffect(() => {
    if (path === null) return;
    let current = true;
    apiJson<T>(path)
      .then((body) => {
        if (!current || !alive.current) return;
        setData(body);
        setError(null);
      })
      .catch((e: Error) => {
        if (current && alive.current) setError(e);
      })
      .finally(() => {
        if (current && alive.current) setLoading(false);
      });
    return () => {
      current = false;
    };
  }, [path, tick]);

  useEffect(() => {
    if (!intervalMs || path === null) return;
    const id = window.setInterval(reload, intervalMs);
    return () => window.clearInterval(id);
  }, [intervalMs, path, reload]);

  const missing = error instanceof ApiError && (error.status === 404 || error.status === 405);
  return { data, error, loading, missing, reload };
}
